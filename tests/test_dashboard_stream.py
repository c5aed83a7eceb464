"""The dashboard's task stream, recent tasks, success rate and transfer-rate sparkline data.

Pure views first (task records in, bounded plain data out), then the whole path: two real
coordinators over the in-memory network behind the real ``Coordinator`` facade, a real
``SwarmDashboard`` and ``CoordinatorSource``; only the front end's comm is recorded.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.client import Coordinator
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.errors import NoCapablePeerError
from swarm_notebook.ledger.transfer import TransferHistory, TransferSample
from swarm_notebook.notebook.source import CoordinatorSource, peer_names, with_task_views
from swarm_notebook.notebook.widget import SwarmDashboard
from swarm_notebook.views.task_stream import recent_tasks, task_stream, task_summary
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from swarm_notebook.workload.records import TaskLog, TaskRecord, TaskState
from tests.support.memory_facade import facade_and_worker
from tests.test_widget import RecordingComm, Signal, channel_of

pytestmark = pytest.mark.timeout(60)


def record(task_id: str, state: str, peer: str | None, start: float, end: float | None,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "id": task_id, "type": "python-computation", "role": "delegated", "peer": peer,
        "state": state, "submitted_at": start - 0.5, "started_at": start, "finished_at": end,
        "tried_peers": [peer] if peer else [], "error": None, **extra,
    }  # fmt: skip


# -- pure views ---------------------------------------------------------------------------


def test_stream_has_a_lane_per_peer_and_a_bar_per_task_in_the_window() -> None:
    records = [
        record("old", "completed", "PB", 10.0, 20.0),  # ended before the window: dropped
        record("a1", "completed", "PA", 800.0, 801.0),
        record("b1", "failed", "PB", 850.0, 852.5),
        record("a2", "working", "PA", 900.0, None),  # still running: open end
        record("x", "rejected", None, 950.0, 950.0),  # never reached a peer: no lane
        {**record("s", "completed", "PA", 960.0, 961.0), "role": "served"},  # not ours
    ]
    stream = task_stream(records, now=1000.0, names={"PA": "alice", "PB": None}, window_s=300)
    assert stream["lanes"] == [{"peer": "PA", "name": "alice"}, {"peer": "PB", "name": None}]
    bars = {bar["id"]: bar for bar in stream["bars"]}
    assert set(bars) == {"a1", "b1", "a2"}
    assert (bars["a1"]["lane"], bars["a1"]["state"], bars["a1"]["start"]) == (0, "completed", 800.0)
    assert (bars["b1"]["lane"], bars["b1"]["end"]) == (1, 852.5)
    assert bars["a2"]["end"] is None and bars["a2"]["state"] == "working"
    assert stream["omitted"] == 0 and stream["window_s"] == 300


def test_stream_keeps_only_the_newest_bars_and_counts_the_rest() -> None:
    records = [record(f"t{i}", "completed", "P", 100.0 + i, 100.5 + i) for i in range(50)]
    stream = task_stream(records, now=200.0, limit=10)
    assert [bar["id"] for bar in stream["bars"]] == [f"t{i}" for i in range(40, 50)]
    assert stream["omitted"] == 40


def test_success_rate_is_none_without_tasks_and_ignores_cancels_and_local_refusals() -> None:
    assert task_summary([])["success_rate"] is None
    only_uncounted = [
        record("c", "canceled", "P", 1.0, 2.0),
        record("r", "rejected", None, 1.0, 1.0),
        record("w", "working", "P", 1.0, None),
    ]
    summary = task_summary(only_uncounted)
    assert summary["success_rate"] is None
    assert (summary["canceled"], summary["not_sent"], summary["finished"]) == (1, 1, 2)
    mixed = [
        *only_uncounted,
        record("ok1", "completed", "P", 1.0, 2.0),
        record("ok2", "completed", "P", 1.0, 2.0),
        record("ok3", "completed", "P", 1.0, 2.0),
        record("bad", "failed", "P", 1.0, 2.0),
    ]
    assert task_summary(mixed)["success_rate"] == 75
    # A peer's refusal did reach the swarm, so it counts against it.
    refused = [record("ok", "completed", "P", 1, 2), record("no", "rejected", "P", 1, 2)]
    assert task_summary(refused)["success_rate"] == 50


def test_recent_tasks_are_finished_newest_first_and_bounded() -> None:
    records = [record(f"t{i}", "completed", "P", float(i), i + 0.25) for i in range(30)]
    records.append(record("run", "working", "P", 40.0, None))
    records.append(record("local", "rejected", None, 50.0, 50.0, error="no capable peer"))
    rows = recent_tasks(records, names={"P": "bob"}, limit=5)
    assert [row["id"] for row in rows] == ["local", "t29", "t28", "t27", "t26"]
    assert rows[0]["sent"] is False and rows[0]["error"] == "no capable peer"
    assert rows[1]["name"] == "bob" and rows[1]["duration_s"] == 0.25 and rows[1]["sent"]


def test_transfer_history_turns_totals_into_bounded_rates() -> None:
    history = TransferHistory(limit=3)
    history.record(100.0, 1_000, 500)
    assert history.samples() == []  # a baseline, not a rate
    history.record(101.0, 3_000, 500)
    history.record(103.0, 7_000, 1_500)
    assert history.samples() == [
        TransferSample(101.0, 2_000.0, 0.0),
        TransferSample(103.0, 2_000.0, 500.0),
    ]
    history.record(104.0, 400, 100)  # totals went down: a new transport counts from zero
    history.record(104.0, 900, 100)  # no time passed: no rate for it
    history.record(105.0, 900, 100)
    assert history.as_rows() == [[103.0, 2000, 500], [104.0, 400, 100], [105.0, 0, 0]]


def test_task_views_name_lanes_from_cards_and_this_peer() -> None:
    snapshot = {"local_peer_id": "ME", "peers": [{"id": "PB", "name": "bob"}, {"id": "PC"}]}
    assert peer_names(snapshot) == {"PB": "bob", "PC": None, "ME": "this peer"}
    shown = with_task_views(dict(snapshot), [record("t", "completed", "PB", 5.0, 6.0)], 10.0)
    assert shown["task_stream"]["lanes"] == [{"peer": "PB", "name": "bob"}]
    assert shown["recent_tasks"][0]["name"] == "bob"
    assert shown["task_summary"]["success_rate"] == 100


# -- the whole path: coordinators, facade, source, widget ----------------------------------


@pytest.fixture
def front_end(monkeypatch: pytest.MonkeyPatch, signal: Signal) -> Iterator[list[RecordingComm]]:
    import comm

    opened: list[RecordingComm] = []

    def create_comm(**kwargs: Any) -> RecordingComm:
        channel = RecordingComm(signal, **kwargs)
        opened.append(channel)
        return channel

    monkeypatch.setattr(comm, "create_comm", create_comm)
    yield opened


@pytest.fixture
def signal() -> Signal:
    return Signal()


@pytest.fixture
async def facade(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, SwarmCoordinator]]:
    """An asker behind the real ``Coordinator`` facade (own network thread) and a worker
    serving file-analysis, joined over the in-memory network."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("x\ny\n")
    worker = CoordinatorConfig(executors=ExecutorConfig(workspace=workspace))
    async with facade_and_worker(tmp_path, worker, "file-management") as joined:
        yield joined


def sent_snapshots(channel: RecordingComm) -> list[dict[str, Any]]:
    return [value for value, _at, _thread in channel.updates("snapshot")]


async def test_dashboard_sends_task_stream_recent_tasks_and_transfer_rates(
    facade: tuple[Coordinator, SwarmCoordinator], front_end: list[RecordingComm], signal: Signal
) -> None:
    coordinator, worker = facade
    dashboard = SwarmDashboard(CoordinatorSource(coordinator), min_interval=0.05)
    channel = channel_of(dashboard)
    try:
        # Nothing ran yet: the success rate is unknown ("-" in the panel), not 100 %.
        assert dashboard.status["success_rate"] is None
        assert dashboard.snapshot["task_stream"]["bars"] == []

        for _ in range(3):
            ok = await coordinator.delegate_task("file-analysis", {"path": "a.txt"})
            assert ok["success"]
        # The worker fails this one: it reached a peer, so it counts against the rate.
        missing = await coordinator.delegate_task("file-analysis", {"path": "missing.txt"})
        assert not missing["success"]
        with pytest.raises(NoCapablePeerError):  # refused here: not sent, not counted
            await coordinator.delegate_task("git-operation", {"op": "log"})

        def shown() -> dict[str, Any] | None:
            for snapshot in reversed(sent_snapshots(channel)):
                if len(snapshot.get("recent_tasks", [])) == 5:
                    return snapshot
            return None

        await signal.until(lambda: shown() is not None, timeout=20)
        snapshot = shown()
        assert snapshot is not None
        stream = snapshot["task_stream"]
        name = coordinator.peer_name(worker.local_id)
        assert stream["lanes"] == [{"peer": worker.local_id, "name": name}]
        assert sorted(bar["state"] for bar in stream["bars"]) == ["completed"] * 3 + ["failed"]
        assert all(bar["lane"] == 0 and bar["end"] >= bar["start"] for bar in stream["bars"])
        recent = snapshot["recent_tasks"]
        assert recent[0]["type"] == "git-operation" and recent[0]["sent"] is False
        assert [row["state"] for row in recent[1:]] == ["failed"] + ["completed"] * 3
        assert snapshot["task_summary"]["success_rate"] == 75
        assert dashboard.status["success_rate"] == 75

        # The sparkline: per-second samples from the transport's byte counters, some of
        # them showing the bytes the requests moved; they travel in the "live" trait.
        def moved() -> bool:
            rows = dashboard.live.get("transfer_rate", {}).get("samples", [])
            return any(row[1] > 0 and row[2] > 0 for row in rows)

        await signal.until(moved, timeout=20)
        transfer = dashboard.live["transfer_rate"]
        assert transfer["interval_s"] == 1.0
        times = [row[0] for row in transfer["samples"]]
        assert times == sorted(times)
        assert "transfer_rate" not in dashboard.snapshot

        # A new sample each second re-sends the few rates, not the whole snapshot again.
        lives, states = len(channel.updates("live")), len(channel.updates("snapshot"))
        await signal.until(lambda: len(channel.updates("live")) >= lives + 2, timeout=20)
        assert len(channel.updates("snapshot")) == states
        now = dashboard.live["now"]
        assert abs(now - time.time()) < 60 and now > times[-1] - 5
    finally:
        await dashboard.aclose()


def test_recent_records_are_bounded_and_keep_older_running_tasks() -> None:
    log = TaskLog(limit=100)
    for i in range(50):
        log.add(TaskRecord(id=f"t{i}", type="x", role="delegated", state=TaskState.COMPLETED))
    log.get("t3").state = TaskState.WORKING  # type: ignore[union-attr]
    assert [r.id for r in log.recent(5)] == ["t3", "t45", "t46", "t47", "t48", "t49"]
    assert [r.id for r in log.recent(100)] == [f"t{i}" for i in range(50)]
