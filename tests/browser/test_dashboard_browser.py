"""The dashboard rendered by a real JupyterLab in headless Chromium.

The notebook defines a tiny DashboardSource by hand: it is the view's input for this test,
not a stand-in for the network (the real-peer browser test drives the quickstart notebook).
"""

from __future__ import annotations

import re

import pytest
from harness import (
    LabServer,
    open_notebook,
    run_all_cells,
    run_cell_and_advance,
    screenshot,
    select_first_cell,
    set_theme,
    watch_page,
    write_notebook,
)
from playwright.sync_api import Locator, Page, expect

pytestmark = pytest.mark.browser

EVIL_PEER = "<img src=x onerror=alert(1)>"
EVIL_CAPABILITY = "<img src=y onerror=alert(2)>"
LOCAL_PEER = "LOCALPEERAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

SOURCE_CELL = '''
from swarm_notebook.notebook.widget import SwarmDashboard


class HandSetSource:
    """DashboardSource whose state this notebook sets by hand (input for the view)."""

    def __init__(self):
        self.state = {"initialized": False, "local_peer_id": None, "connected_peers": 0,
                      "total_peers": 0, "capabilities": [], "peers": [], "total_tasks": 0,
                      "tasks_completed": 0, "tasks_failed": 0, "patterns_shared": 0,
                      "consensus_requests": 0, "knowledge_queries": 0, "last_activity": None,
                      "tasks_in_flight": [], "latest_consensus": None, "latest_reflections": []}
        self.callbacks = []

    def dashboard_snapshot(self):
        return dict(self.state)

    def on_change(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def update(self, **changes):
        self.state.update(changes)
        for callback in list(self.callbacks):
            callback()

    async def reinitialize(self):
        self.update(local_peer_id="REINITIALIZED" + "B" * 39,
                    capabilities=self.state["capabilities"] + ["git-vfs"])


source = HandSetSource()
dashboard = SwarmDashboard(source)
dashboard
'''

UPDATE_CELL = f"""
import time

now = time.time()
source.update(
    initialized=True,
    local_peer_id={LOCAL_PEER!r},
    connected_peers=2,
    total_peers=3,
    capabilities=["python-execution", "local-llm"],
    peers=[
        {{"id": {EVIL_PEER!r}, "capabilities": [{EVIL_CAPABILITY!r}], "state": "connected",
          "load": 0.9, "in_flight": 2, "concurrency": 2, "rtt_ms": 0.43}},
        {{"id": "PEERB" + "C" * 47, "name": "bob-workstation",
          "capabilities": ["python-execution", "git-vfs"], "state": "connected",
          "load": 0.25, "in_flight": 0, "concurrency": 4, "rtt_ms": 1.2,
          "route": "relay", "ice_server": "turn:turn.example.org:3478",
          "bytes_in": 5_300_000, "bytes_out": 1_200_000, "isolation": "none"}},
        {{"id": "PEERC" + "D" * 47, "capabilities": [], "state": "connecting",
          "load": 0.0, "in_flight": 0, "concurrency": 1, "rtt_ms": None}},
    ],
    total_tasks=3, tasks_completed=2, tasks_failed=1, patterns_shared=1,
    consensus_requests=1, knowledge_queries=2,
    last_activity={{"kind": "task-completed", "timestamp": now}},
    tasks_in_flight=[{{"id": "task-7f3a", "type": "python-computation",
                       "peer": {EVIL_PEER!r}, "state": "working", "elapsed_s": 1.8}}],
    latest_consensus={{"proposal_id": "prop-1", "target": "core/app.py", "risk": "high",
                       "consensus": False, "reason": "1 of 3 approved", "approve_count": 1,
                       "reject_count": 1, "missing": ["PEERC" + "D" * 47],
                       "votes": {{"PEERB" + "C" * 47: {{"approve": True, "reason": "tests pass"}},
                                 {EVIL_PEER!r}: {{"approve": False,
                                                  "reason": "<b>touches core</b>"}}}}}},
    latest_reflections=[{{"category": "performance", "outcome": "success",
                          "description": "<script>alert(3)</script> vectorise the groupby",
                          "shared_from": "PEERB" + "C" * 47, "timestamp": now}},
                         {{"category": "bug", "outcome": "failure",
                           "description": "retry on timeout", "shared_from": None,
                           "timestamp": now}}],
    task_stream={{"window_s": 300, "omitted": 0,
                  "lanes": [{{"peer": {EVIL_PEER!r}, "name": "<b>evil lane</b>"}}],
                  "bars": [{{"id": "t1", "type": "<b>x</b>", "lane": 0, "state": "completed",
                             "start": now - 3, "end": now - 1}},
                           {{"id": "t2", "type": "y", "lane": 0, "state": "<img src=z>",
                             "start": now - 2, "end": None}}]}},
    recent_tasks=[{{"id": "t1", "type": "<b>x</b>", "peer": {EVIL_PEER!r},
                    "name": "<b>evil lane</b>", "state": "completed", "finished_at": now - 1,
                    "duration_s": 2.0, "sent": True, "error": None}}],
    resident_data={{"total": 6, "omitted": 5, "owned": 6, "owned_bytes": 60, "store": None,
                    "refs": [{{"ref_id": "ref-<b>1</b>", "role": "owned", "state": "<b>s</b>",
                               "size": 10, "summary": "<img src=q onerror=alert(4)>: int64",
                               "holders": [{{"peer": {EVIL_PEER!r}, "name": "<b>holder</b>"}}],
                               "owner": {{"peer": {LOCAL_PEER!r}, "name": "this peer"}}}}]}},
)
"""


def panel(page: Page) -> Locator:
    return page.locator(".swarm-nb-panel").first


def test_dashboard_renders_updates_escapes_and_initializes(lab: LabServer, page: Page) -> None:
    write_notebook(lab.root_dir, "dashboard_view.ipynb", [SOURCE_CELL, UPDATE_CELL])
    problems = watch_page(page, lab)
    open_notebook(page, lab, "dashboard_view.ipynb")

    # Cell 1 alone: the panel appears with the empty, not-initialized state.
    select_first_cell(page)
    run_cell_and_advance(page)
    view = panel(page)
    expect(view.get_by_test_id("stat-tasks")).to_have_text("0", timeout=90_000)
    expect(view.get_by_test_id("status-state")).to_have_text("disabled")
    expect(view.get_by_test_id("status-state")).to_have_class(
        re.compile(r"swarm-nb-state--disabled")
    )
    expect(view.get_by_test_id("init-button")).to_have_text("▶ Initialize")
    screenshot(view, "dashboard-initial-panel")

    # Cell 2 changes the source: the kernel pushes, the open view re-renders in place.
    run_cell_and_advance(page)
    expect(view.get_by_test_id("stat-tasks")).to_have_text("3")
    expect(view.get_by_test_id("stat-success")).to_have_text("67%")
    expect(view.get_by_test_id("stat-patterns")).to_have_text("1")
    expect(view.get_by_test_id("status-state")).to_have_text("active")
    expect(view.get_by_test_id("status-state")).to_have_class(re.compile(r"swarm-nb-state--active"))
    expect(view.get_by_test_id("peer-count")).to_have_text("2 / 3")
    expect(view.get_by_test_id("peer-row")).to_have_count(3)
    expect(view.get_by_test_id("peer-row").nth(1)).to_contain_text("bob-workstation")
    bob = view.get_by_test_id("peer-row").nth(1)
    expect(bob.get_by_test_id("peer-route")).to_have_text("relay via turn:turn.example.org:3478")
    expect(bob.get_by_test_id("peer-bytes")).to_have_text("↓ 5.3 MB ↑ 1.2 MB")
    expect(bob.get_by_test_id("peer-unsafe")).to_have_text("runs code without isolation")
    expect(view.get_by_test_id("peer-route")).to_have_count(1)  # only links that report one

    # Peer-supplied markup is shown as text and never becomes elements.
    evil_row = view.get_by_test_id("peer-row").first
    expect(evil_row.locator(".swarm-nb-peer-id")).to_have_attribute("title", EVIL_PEER)
    expect(evil_row.locator(".swarm-nb-peer-id")).to_have_text(EVIL_PEER[:16] + "…")
    expect(evil_row.get_by_text(EVIL_CAPABILITY, exact=True)).to_be_visible()
    expect(view.get_by_test_id("reflections")).to_contain_text("<script>alert(3)</script>")
    expect(view.get_by_test_id("consensus")).to_contain_text("<b>touches core</b>")
    expect(view.get_by_test_id("tasks-in-flight")).to_contain_text("python-computation")
    # The stream draws peer-supplied names as text; a state it does not know as "unknown".
    stream = view.get_by_test_id("task-stream")
    expect(stream.get_by_test_id("stream-lane")).to_contain_text("<b>evil lane</b>")
    expect(stream.locator('[data-state="completed"]')).to_have_count(1)
    expect(stream.locator('[data-state="unknown"]')).to_have_count(1)
    expect(view.get_by_test_id("recent-task")).to_contain_text("<b>evil lane</b>")
    # Resident data: remote-supplied names and summaries as text, bounded with "and N more".
    ref_row = view.get_by_test_id("ref-row")
    expect(ref_row).to_have_count(1)
    expect(ref_row).to_have_attribute("data-state", "unknown")
    expect(ref_row).to_contain_text("<img src=q onerror=alert(4)>: int64")
    expect(ref_row.get_by_test_id("ref-holders")).to_have_text("<b>holder</b>")
    expect(view.get_by_test_id("refs-more")).to_contain_text("and 5 more")
    assert view.locator("img, script, b").count() == 0
    view.scroll_into_view_if_needed()
    screenshot(page, "dashboard-light")
    screenshot(view, "dashboard-light-panel")

    # The button round-trips through the kernel: reinitialize() runs, busy clears.
    view.get_by_test_id("init-button").click()
    expect(view).to_contain_text("REINITIALIZED")
    expect(view.get_by_test_id("init-button")).to_have_text("▶ Reinitialize")
    expect(view.get_by_test_id("init-button")).to_be_enabled()
    expect(view.get_by_text("git-vfs", exact=True).first).to_be_visible()

    # Dark theme, and Run All Cells from the menu re-creates the panel from scratch.
    set_theme(page, "JupyterLab Dark")
    run_all_cells(page)
    expect(view).not_to_contain_text("REINITIALIZED", timeout=90_000)
    expect(view.get_by_test_id("stat-tasks")).to_have_text("3", timeout=90_000)
    expect(view.get_by_test_id("status-state")).to_have_class(re.compile(r"swarm-nb-state--active"))
    assert view.locator("img, script, b").count() == 0
    view.scroll_into_view_if_needed()
    screenshot(page, "dashboard-dark")
    screenshot(view, "dashboard-dark-panel")

    assert problems == [], problems
