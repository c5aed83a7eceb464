"""quickstart.ipynb in a real JupyterLab, in headless Chromium, against real workers.

The dashboard must render and its task count must move when ``%%swarm run`` delegates.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from harness import (
    LabServer,
    lab_joining,
    open_notebook,
    python_workers,
    run_cell_and_advance,
    screenshot,
    select_first_cell,
    watch_page,
)
from playwright.sync_api import Page, expect

from tests.support.swarm import Swarm

pytestmark = [pytest.mark.browser, pytest.mark.timeout(400)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
ROOM = "browser"
SECRET = "browser-test-secret"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with python_workers(tmp_path_factory.mktemp("swarm"), ROOM, SECRET, "w0", "w1") as running:
        yield running


@pytest.fixture(scope="module")
def lab(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The harness' lab, started with what `swarm-notebook up` gives its kernels."""
    with lab_joining(tmp_path_factory.mktemp("lab"), swarm.url, ROOM, SECRET) as server:
        yield server


def test_quickstart_dashboard_counts_the_delegation(lab: LabServer, page: Page) -> None:
    shutil.copyfile(NOTEBOOK, lab.root_dir / NOTEBOOK.name)
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    dashboard_at = next(i for i, c in enumerate(cells) if c.source.strip() == "%swarm dashboard")
    problems = watch_page(page, lab)
    open_notebook(page, lab, NOTEBOOK.name)

    # Up to the dashboard: joined, two workers connected, no task yet.
    select_first_cell(page)
    for _ in range(dashboard_at + 1):
        run_cell_and_advance(page)
    view = page.locator(".swarm-nb-panel").first
    expect(view.get_by_test_id("stat-tasks")).to_have_text("0", timeout=120_000)
    expect(view.get_by_test_id("status-state")).to_have_text("active", timeout=60_000)
    expect(view.get_by_test_id("peer-count")).to_have_text("2 / 2")
    expect(view.get_by_test_id("peer-row")).to_have_count(2)
    screenshot(view, "quickstart-dashboard-before")

    # The rest of the notebook delegates twice (%%swarm run, then --no-wait).
    for _ in range(len(cells) - dashboard_at - 1):
        run_cell_and_advance(page)
    expect(view.get_by_test_id("stat-tasks")).to_have_text("2", timeout=180_000)
    expect(view.get_by_test_id("stat-success")).to_have_text("100%")
    outputs = page.locator(".jp-NotebookPanel .jp-OutputArea-output")
    expect(outputs.filter(has_text="computed in worker process")).to_have_count(1)
    expect(outputs.filter(has_text="✔ python-computation completed on").first).to_be_visible()
    # --no-wait: its one line turns into the summary too (no stale "state=submitted").
    expect(outputs.filter(has_text="✔ python-computation completed on")).to_have_count(2)
    expect(outputs.filter(has_text="state=submitted")).to_have_count(0)
    expect(outputs.filter(has_text="rows: 3")).to_have_count(1)
    view.scroll_into_view_if_needed()
    screenshot(view, "quickstart-dashboard-after")
    page.locator(".jp-NotebookPanel .jp-Cell").nth(dashboard_at + 4).scroll_into_view_if_needed()
    screenshot(page, "quickstart-run")
    assert problems == [], problems
