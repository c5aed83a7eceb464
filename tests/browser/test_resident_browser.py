"""The dashboard's "Resident data" section in a real JupyterLab, in headless Chromium,
against two real worker processes joined through a real signaling server.

The notebook puts a frame with ``c.put`` and the ref's row appears in its panel, its holder
by the worker's name; a second coordinator in the same kernel, one that runs others' code,
holds a ref and its panel shows its store's use. Releasing empties both again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from harness import (
    LabServer,
    join_cell,
    lab_joining,
    open_notebook,
    python_workers,
    run_cell_and_advance,
    screenshot,
    select_first_cell,
    set_theme,
    watch_page,
    write_notebook,
)
from playwright.sync_api import Locator, Page, expect

from tests.support.swarm import Swarm

pytestmark = [pytest.mark.browser, pytest.mark.timeout(500)]

ROOM = "resident"
SECRET = "resident-browser-secret"
LONG_MS = 180_000
HOLDER_NAME = "holder-notebook"

PUT_CELL = """
import pandas as pd

frame = pd.DataFrame({"a": range(1000), "b": [0.5] * 1000})
ref = await c.put(frame)
print("put:", ref.ref_id[:8], "on", c.peer_name(ref.holders[0]))
"""

HOLDER_CELL = f"""
h = await swarm_notebook.join(
    os.environ["SWARM_NOTEBOOK_ROOM"],
    signaling=os.environ["SWARM_NOTEBOOK_SIGNALING"],
    secret=os.environ["SWARM_NOTEBOOK_SECRET"],
    profile=os.path.join(os.environ["SWARM_NOTEBOOK_PROFILE"], "holder"),
    allow_remote_code=True,
    name={HOLDER_NAME!r},
)
await c.wait_for_peers(3, capability="python-execution", timeout=120)
kept = await c.put(frame.head(10), peer=h.peer_id)
print("kept:", kept.ref_id[:8], "for", c.name)
h.dashboard()
"""

RELEASE_CELL = """
await ref.release()
await kept.release()
print("released")
"""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with python_workers(tmp_path_factory.mktemp("swarm"), ROOM, SECRET, "w0", "w1") as running:
        yield running


@pytest.fixture(scope="module")
def lab(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    with lab_joining(tmp_path_factory.mktemp("lab"), swarm.url, ROOM, SECRET) as server:
        yield server


def printed(page: Page, pattern: str) -> re.Match[str]:
    """Wait for a cell to print a line matching ``pattern``; its match."""
    outputs = page.locator(".jp-NotebookPanel .jp-OutputArea-output")
    line = outputs.filter(has_text=re.compile(pattern))
    expect(line).to_have_count(1, timeout=LONG_MS)
    found = re.search(pattern, line.inner_text())
    assert found is not None
    return found


def luminance(css_color: str) -> float:
    """Relative luminance (WCAG) of an ``rgb(...)`` / ``rgba(...)`` colour."""
    channels = [float(v) / 255 for v in re.findall(r"[\d.]+", css_color)[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two ``rgb(...)`` colours."""
    light, dark = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


# A panel's sections are rebuilt on every update (stats move with each heartbeat), so a
# section's element may be replaced between two calls: these read and scroll from the
# panel's root, which stays, in one step each; screenshots are of whole panels.
RESIDENT = 'details[data-section="resident"]'
COLOURS = f"""root => {{
    const section = root.querySelector('{RESIDENT}');
    const colour = (selector) => getComputedStyle(section.querySelector(selector)).color;
    return [getComputedStyle(section).backgroundColor,
            colour('[data-testid="ref-row"]'), colour('.swarm-nb-ref-badge')];
}}"""


def show_resident(view: Locator) -> None:
    view.evaluate(f"root => root.querySelector('{RESIDENT}').scrollIntoView({{block: 'center'}})")


def readable(view: Locator) -> None:
    """A row's text and its state badge stand out from the section (WCAG AA large: 3)."""
    background, row, badge = view.evaluate(COLOURS)
    for colour in (row, badge):
        assert contrast(colour, background) >= 3.0, (colour, background)


def test_a_put_ref_shows_in_the_panel_with_its_holder_by_name(lab: LabServer, page: Page) -> None:
    cells = [join_cell("resident"), PUT_CELL, HOLDER_CELL, RELEASE_CELL]
    write_notebook(lab.root_dir, "resident.ipynb", cells)
    problems = watch_page(page, lab)
    open_notebook(page, lab, "resident.ipynb")
    select_first_cell(page)
    run_cell_and_advance(page)
    view = page.locator(".swarm-nb-panel").first
    expect(view.get_by_test_id("status-state")).to_have_text("active", timeout=LONG_MS)
    section = view.locator(RESIDENT)
    expect(section.locator("summary")).to_have_text("Resident Data (0)")
    expect(section.get_by_test_id("refs-empty")).to_contain_text("No resident data")
    expect(section.get_by_test_id("store-usage")).to_have_count(0)  # the notebook holds nothing

    run_cell_and_advance(page)
    put = printed(page, r"put: (\w{8}) on (w[01])")
    short, holder = put.group(1), put.group(2)
    rows = section.get_by_test_id("ref-row")
    expect(rows).to_have_count(1, timeout=60_000)
    expect(section.locator("summary")).to_have_text("Resident Data (1)")
    row = rows.first
    expect(row).to_contain_text(short)
    expect(row).to_contain_text("1000 × 2 · a: int64, b: float64")
    expect(row.get_by_test_id("ref-holders")).to_have_text(holder)  # the worker's name
    expect(row).to_have_attribute("data-state", "held")
    expect(section.get_by_test_id("refs-empty")).to_have_count(0)
    show_resident(view)
    readable(view)
    screenshot(view, "resident-data-light-panel")

    # A holder's own panel: the store's use against its budget, and whose data it keeps.
    run_cell_and_advance(page)
    kept = printed(page, r"kept: (\w{8}) for (\S+)")
    holder_view = page.locator(".swarm-nb-panel").nth(1)
    held = holder_view.locator(RESIDENT)
    expect(held.get_by_test_id("store-refs")).to_have_text("1", timeout=LONG_MS)
    expect(held.get_by_test_id("store-memory")).to_have_text(
        re.compile(r"^\d+(\.\d)? kB / 536\.9 MB$")
    )
    expect(held.get_by_test_id("store-spill")).to_have_text("no spill folder")
    expect(held.get_by_test_id("store-counters")).to_have_text("0 evicted · 0 spilled · 0 refused")
    held_row = held.get_by_test_id("ref-row")
    expect(held_row).to_have_count(1)
    expect(held_row).to_contain_text(kept.group(1))
    expect(held_row.get_by_test_id("ref-holders")).to_have_text(f"here, for {kept.group(2)}")
    # The notebook's own panel lists the second ref too, held by the holder notebook.
    expect(rows).to_have_count(2)
    expect(rows.first.get_by_test_id("ref-holders")).to_have_text(HOLDER_NAME)
    show_resident(holder_view)
    screenshot(holder_view, "resident-store-light-panel")

    set_theme(page, "JupyterLab Dark")
    expect(rows).to_have_count(2)
    show_resident(view)
    readable(view)
    readable(holder_view)
    screenshot(view, "resident-data-dark-panel")
    show_resident(holder_view)
    screenshot(holder_view, "resident-store-dark-panel")
    set_theme(page, "JupyterLab Light")

    run_cell_and_advance(page)
    printed(page, r"^released")
    expect(section.get_by_test_id("refs-empty")).to_be_visible(timeout=60_000)
    expect(section.locator("summary")).to_have_text("Resident Data (0)")
    expect(held.get_by_test_id("store-refs")).to_have_text("0")
    expect(held.get_by_test_id("store-counters")).to_contain_text("1 evicted")
    expect(held.get_by_test_id("refs-empty")).to_be_visible()
    assert problems == [], problems
