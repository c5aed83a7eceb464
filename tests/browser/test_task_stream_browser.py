"""The dashboard's task stream and transfer sparkline, and its state after a kernel
restart, in a real JupyterLab in headless Chromium against two real worker processes
joined through a real signaling server."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from harness import (
    LabServer,
    join_cell,
    lab_joining,
    menu,
    open_notebook,
    python_workers,
    run_cell_and_advance,
    screenshot,
    select_first_cell,
    set_theme,
    wait_kernel_idle,
    watch_page,
    write_notebook,
)
from playwright.sync_api import Locator, Page, expect

from tests.support.swarm import Swarm

pytestmark = [pytest.mark.browser, pytest.mark.timeout(500)]

ROOM = "stream"
SECRET = "stream-browser-secret"
LONG_MS = 180_000

TASKS_CELL = """
def slow_double(x):
    import time

    time.sleep(0.4)  # the task's own work: long enough to draw as a bar
    return 2 * x


def divide(x):
    return 1 / x


futures = [c.submit(slow_double, i) for i in range(6)]
doubled = [await f for f in futures]
try:
    await c.submit(divide, 0)
except Exception as error:  # the remote ZeroDivisionError
    print("remote error:", type(error).__name__)
print("doubled:", doubled)
"""

RUNNING_CELL = """
def nap(seconds):
    import time

    time.sleep(seconds)  # the task's own work: it must still run while the test looks
    return seconds


napping = c.submit(nap, 4.0)
"""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with python_workers(tmp_path_factory.mktemp("swarm"), ROOM, SECRET, "w0", "w1") as running:
        yield running


@pytest.fixture(scope="module")
def lab(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    with lab_joining(tmp_path_factory.mktemp("lab"), swarm.url, ROOM, SECRET) as server:
        yield server


def panel(page: Page) -> Locator:
    return page.locator(".swarm-nb-panel").first


def fill_of(bar: Locator) -> str:
    return str(bar.evaluate("el => getComputedStyle(el).fill"))


def test_task_stream_and_sparkline_show_real_tasks(lab: LabServer, page: Page) -> None:
    cells = [join_cell("stream"), TASKS_CELL, RUNNING_CELL, "await napping"]
    write_notebook(lab.root_dir, "task_stream.ipynb", cells)
    problems = watch_page(page, lab)
    open_notebook(page, lab, "task_stream.ipynb")
    select_first_cell(page)
    run_cell_and_advance(page)
    view = panel(page)
    expect(view.get_by_test_id("status-state")).to_have_text("active", timeout=LONG_MS)
    expect(view.get_by_test_id("peer-count")).to_have_text("2 / 2")
    # No task yet: the rate is unknown, not 100 %.
    expect(view.get_by_test_id("stat-success")).to_have_text("-")
    expect(view.get_by_test_id("recent-tasks")).to_have_text("No finished tasks yet")

    run_cell_and_advance(page)
    outputs = page.locator(".jp-NotebookPanel .jp-OutputArea-output")
    done = outputs.filter(has_text="doubled: [0, 2, 4, 6, 8, 10]")
    expect(done).to_have_count(1, timeout=LONG_MS)
    expect(outputs.filter(has_text="remote error: RemoteTaskError")).to_have_count(1)

    stream = view.get_by_test_id("task-stream")
    bars = stream.get_by_test_id("stream-bar")
    expect(bars).to_have_count(7, timeout=60_000)
    expect(stream.locator('[data-state="completed"]')).to_have_count(6)
    expect(stream.locator('[data-state="failed"]')).to_have_count(1)
    # One lane per worker that ran something, each with its bars (6 concurrent tasks on
    # two workers: both get some).
    lanes = stream.get_by_test_id("stream-lane")
    expect(lanes).to_have_count(2)
    for index in range(2):
        assert lanes.nth(index).get_by_test_id("stream-bar").count() >= 1
    expect(view.get_by_test_id("stat-success")).to_have_text("86%")  # 6 of 7
    expect(view.get_by_test_id("recent-task")).to_have_count(7)
    expect(view.get_by_test_id("recent-task").first).to_contain_text("failed")

    # The sparkline: samples every second from the transport's byte counters.
    spark_in = view.get_by_test_id("sparkline-in")
    several = re.compile(r"^([3-9]|\d\d+)$")
    expect(spark_in).to_have_attribute("data-points", several, timeout=60_000)
    points = str(spark_in.get_attribute("points")).split()
    assert len(points) >= 3
    heights = {float(p.split(",")[1]) for p in points}
    assert len(heights) > 1, "the requests' bytes must show as a rise in the line"

    completed = stream.locator('[data-state="completed"]').first
    failed = stream.locator('[data-state="failed"]').first
    light = (fill_of(completed), fill_of(failed))
    assert light[0] != light[1], light
    view.scroll_into_view_if_needed()
    screenshot(view, "task-stream-light-panel")

    set_theme(page, "JupyterLab Dark")
    expect(bars).to_have_count(7)
    dark = (fill_of(completed), fill_of(failed))
    assert dark[0] != dark[1] and dark != light, (light, dark)
    view.scroll_into_view_if_needed()
    screenshot(view, "task-stream-dark-panel")
    set_theme(page, "JupyterLab Light")

    # A task still running draws as an open bar that turns completed when it ends.
    run_cell_and_advance(page)
    expect(stream.locator('[data-state="working"]')).to_have_count(1, timeout=60_000)
    run_cell_and_advance(page)
    expect(stream.locator('[data-state="completed"]')).to_have_count(7, timeout=60_000)
    expect(stream.locator('[data-state="working"]')).to_have_count(0)
    assert problems == [], problems


def restart_kernel(page: Page) -> None:
    menu(page, "Kernel", "Restart Kernel…")
    # The dialog's "Restart" button carries this accessible name.
    page.locator(".jp-Dialog").get_by_role("button", name="Confirm Kernel Restart").click()


def test_kernel_restart_shows_a_disconnected_panel(lab: LabServer, page: Page) -> None:
    write_notebook(lab.root_dir, "restart.ipynb", [join_cell("restart")])
    problems = watch_page(page, lab)
    open_notebook(page, lab, "restart.ipynb")
    select_first_cell(page)
    run_cell_and_advance(page)
    view = panel(page)
    expect(view.get_by_test_id("status-state")).to_have_text("active", timeout=LONG_MS)
    # The workers, and the other test's notebook when its kernel still runs.
    expect(view.get_by_test_id("peer-row").nth(1)).to_be_visible()

    restart_kernel(page)
    wait_kernel_idle(page)
    expect(view.get_by_test_id("status-state")).to_have_text("disconnected")
    expect(view.get_by_test_id("disconnected")).to_contain_text("Kernel disconnected")
    expect(view.get_by_test_id("reconnect-help")).to_contain_text("%swarm dashboard")
    expect(view.get_by_test_id("reconnect-help")).to_contain_text("%swarm join")
    # Nothing stale is left claiming to be live.
    expect(view.get_by_test_id("peer-row")).to_have_count(0)
    expect(view.get_by_test_id("task-stream")).to_have_count(0)

    # The button the issue found throwing "Cannot send": it explains instead.
    view.get_by_test_id("init-button").click()
    expect(view.get_by_test_id("reinitialize-unavailable")).to_be_visible()
    view.scroll_into_view_if_needed()
    screenshot(view, "dashboard-disconnected-panel")
    assert problems == [], problems


def test_kernel_shutdown_shows_a_disconnected_panel(lab: LabServer, page: Page) -> None:
    # A shut-down kernel closes no comm and fires no widget event (unlike a restart): the
    # panel must notice by itself, before anyone clicks.
    write_notebook(lab.root_dir, "shutdown.ipynb", [join_cell("shutdown")])
    problems = watch_page(page, lab)
    open_notebook(page, lab, "shutdown.ipynb")
    select_first_cell(page)
    run_cell_and_advance(page)
    view = panel(page)
    expect(view.get_by_test_id("status-state")).to_have_text("active", timeout=LONG_MS)

    menu(page, "Kernel", "Shut Down Kernel")
    expect(view.get_by_test_id("status-state")).to_have_text("disconnected", timeout=30_000)
    expect(view.get_by_test_id("reconnect-help")).to_contain_text("%swarm dashboard")
    expect(view.get_by_test_id("peer-row")).to_have_count(0)
    view.get_by_test_id("init-button").click()
    expect(view.get_by_test_id("reinitialize-unavailable")).to_be_visible()
    assert problems == [], problems
