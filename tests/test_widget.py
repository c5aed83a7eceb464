"""SwarmDashboard without a browser: what reaches the front end, and when.

The front end's side of the comm channel is replaced by ``RecordingComm``, a stand-in
for the Jupyter front end that records every message the widget publishes.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import comm
import pytest
from comm.base_comm import BaseComm

from swarm_notebook.errors import SwarmError, UsageError
from swarm_notebook.membership.node import PeerState
from swarm_notebook.notebook.widget import (
    DashboardSource,
    DisplayLimits,
    SwarmDashboard,
    display_snapshot,
    static_asset,
)
from swarm_notebook.views.status import dashboard_status, success_rate
from swarm_notebook.workload.records import TaskState
from swarm_notebook.workload.refs import RefState

REPO = Path(__file__).resolve().parents[1]


class Signal:
    """Wakes waiters whenever something observable happened on the loop thread."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def pulse(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._event.wait()


class RecordingComm(BaseComm):
    """Stand-in for the front end's end of the widget comm: records what was published."""

    def __init__(self, signal: Signal, **kwargs: Any) -> None:
        self.signal = signal
        self.messages: list[tuple[str, dict[str, Any], float, int]] = []
        super().__init__(**kwargs)

    def publish_msg(self, msg_type: str, data: Any = None, *args: Any, **kwargs: Any) -> None:
        loop_time = asyncio.get_running_loop().time()
        self.messages.append((msg_type, copy.deepcopy(data), loop_time, threading.get_ident()))
        self.signal.pulse()

    def updates(self, key: str) -> list[tuple[Any, float, int]]:
        """Values of ``key`` sent in state updates, with loop time and sending thread."""
        return [
            (data["state"][key], at, thread)
            for msg_type, data, at, thread in self.messages
            if msg_type == "comm_msg" and data.get("method") == "update" and key in data["state"]
        ]

    def from_front_end(self, content: dict[str, Any]) -> None:
        """Deliver a custom message the way the kernel does when the panel calls send()."""
        self.handle_msg(
            {"content": {"data": {"method": "custom", "content": content}}, "buffers": []}
        )


class ScriptedSource:
    """A DashboardSource whose state the test sets directly: the view's input, not a network."""

    def __init__(self, signal: Signal, **snapshot: Any) -> None:
        self._signal = signal
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"initialized": False, "total_tasks": 0, **snapshot}
        self._callbacks: list[Callable[[], None]] = []
        self.reads = 0
        self.reinitialize_calls = 0
        self.gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None

    def dashboard_snapshot(self) -> dict[str, Any]:
        with self._lock:
            self.reads += 1
            snapshot = copy.deepcopy(self._snapshot)
        self._signal.pulse()
        return snapshot

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def update(self, **changes: Any) -> None:
        with self._lock:
            self._snapshot.update(changes)
        self.notify()

    def notify(self) -> None:
        for callback in list(self._callbacks):
            callback()

    @property
    def subscribers(self) -> int:
        return len(self._callbacks)

    async def reinitialize(self) -> None:
        self.reinitialize_calls += 1
        self._signal.pulse()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.update(initialized=True, local_peer_id="local-peer")


def channel_of(dashboard: SwarmDashboard) -> RecordingComm:
    assert isinstance(dashboard.comm, RecordingComm)
    return dashboard.comm


@pytest.fixture
def signal() -> Signal:
    return Signal()


@pytest.fixture
def front_end(monkeypatch: pytest.MonkeyPatch, signal: Signal) -> Iterator[list[RecordingComm]]:
    opened: list[RecordingComm] = []

    def create_comm(**kwargs: Any) -> RecordingComm:
        channel = RecordingComm(signal, **kwargs)
        opened.append(channel)
        return channel

    monkeypatch.setattr(comm, "create_comm", create_comm)
    yield opened


async def test_source_matches_protocol(signal: Signal) -> None:
    assert isinstance(ScriptedSource(signal), DashboardSource)
    with pytest.raises(UsageError, match="bad-source"):
        SwarmDashboard(object())  # type: ignore[arg-type]


async def test_initial_state_travels_with_comm_open(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal, total_tasks=4, tasks_completed=3, tasks_failed=1)
    dashboard = SwarmDashboard(source)
    channel = channel_of(dashboard)
    msg_type, data, _, _ = channel.messages[0]
    assert msg_type == "comm_open"
    state = data["state"]
    assert state["snapshot"]["total_tasks"] == 4
    assert state["status"]["state"] == "disabled"
    assert state["status"]["success_rate"] == 75
    assert state["busy"] is False
    # The JS draws states from this one list, sent by Python, and keeps no copy of its own.
    assert state["states"] == {
        "peer": list(PeerState),
        "task": list(TaskState),
        "ref": list(RefState),
    }
    assert state["states"]["peer"] == ["connecting", "connected", "gone"]
    js = (REPO / "js" / "widget.js").read_text()
    assert not any(f'"{s}"' in js for s in PeerState if s != PeerState.GONE)
    # ("local" is also the reflections' word for "not shared", unrelated to refs.)
    assert not any(f'"{s}"' in js for s in RefState if s != RefState.LOCAL)
    assert state["_esm"] == js
    assert state["_css"] == (REPO / "js" / "widget.css").read_text()
    await dashboard.aclose()


async def test_burst_from_another_thread_is_coalesced(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    dashboard = SwarmDashboard(source, min_interval=0.25)
    channel = channel_of(dashboard)
    loop_thread = threading.get_ident()
    burst = 200

    def fire() -> None:
        for total in range(1, burst + 1):
            source.update(total_tasks=total)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.to_thread(fire)
    burst_seconds = loop.time() - started

    def final_sent() -> bool:
        sent = channel.updates("snapshot")
        return bool(sent) and sent[-1][0]["total_tasks"] == burst

    await signal.until(final_sent)
    sent = channel.updates("snapshot")
    # One update per 250 ms window at most, however many changes the burst had.
    assert len(sent) <= math.ceil(burst_seconds / 0.25) + 1
    assert len(sent) < burst
    times = [at for _, at, _ in sent]
    assert all(later - earlier >= 0.24 for earlier, later in itertools.pairwise(times))
    assert {thread for _, _, thread in sent} == {loop_thread}
    assert channel.updates("status")[-1][0]["secondary_metric"] == f"{burst} tasks"
    await dashboard.aclose()


async def test_unchanged_snapshot_is_not_sent(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal, total_tasks=1)
    dashboard = SwarmDashboard(source, min_interval=0.0)
    channel = channel_of(dashboard)
    reads = source.reads

    source.notify()
    await signal.until(lambda: source.reads == reads + 1)
    assert channel.updates("snapshot") == []
    assert dashboard.counters["unchanged"] == 1

    source.update(total_tasks=2)
    await signal.until(lambda: len(channel.updates("snapshot")) == 1)
    assert channel.updates("snapshot")[0][0]["total_tasks"] == 2
    assert dashboard.counters["pushes"] == 1
    await dashboard.aclose()


async def test_initialize_message_runs_reinitialize_and_toggles_busy(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    source.gate = asyncio.Event()
    dashboard = SwarmDashboard(source, min_interval=0.0)
    channel = channel_of(dashboard)

    channel.from_front_end({"action": "initialize"})
    await signal.until(lambda: source.reinitialize_calls == 1)
    assert [v for v, _, _ in channel.updates("busy")] == [True]
    assert dashboard.busy is True

    # A second click while the first is running must not start another reinitialize.
    channel.from_front_end({"action": "initialize"})
    source.gate.set()
    await signal.until(lambda: [v for v, _, _ in channel.updates("busy")] == [True, False])
    assert dashboard.busy is False
    assert source.reinitialize_calls == 1
    assert dashboard.counters["rejected_messages"] == 1
    await signal.until(lambda: dashboard.snapshot.get("initialized") is True)
    assert dashboard.status["state"] == "idle"
    assert dashboard.status["error"] is None
    await dashboard.aclose()


async def test_initialize_failure_is_shown_not_swallowed(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    source.fail_with = ConnectionRefusedError("signaling server unreachable")
    dashboard = SwarmDashboard(source, min_interval=0.0)
    channel = channel_of(dashboard)

    channel.from_front_end({"action": "initialize"})
    await signal.until(lambda: [v for v, _, _ in channel.updates("busy")] == [True, False])
    await signal.until(lambda: bool(channel.updates("status")))
    status = channel.updates("status")[-1][0]
    assert status["error"]["code"] == "initialize-failed"
    assert "signaling server unreachable" in status["error"]["message"]
    assert status["message"] == status["error"]["message"]
    assert dashboard.counters["errors"] == 1

    source.fail_with = None
    channel.from_front_end({"action": "initialize"})
    await signal.until(lambda: dashboard.status.get("error") is None and not dashboard.busy)
    assert source.reinitialize_calls == 2
    await dashboard.aclose()


async def test_initialize_timeout_is_reported(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    source.gate = asyncio.Event()  # never released: reinitialize hangs
    dashboard = SwarmDashboard(source, initialize_timeout=0.05)
    channel = channel_of(dashboard)
    channel.from_front_end({"action": "initialize"})
    await signal.until(lambda: [v for v, _, _ in channel.updates("busy")] == [True, False])
    assert dashboard.status["error"]["code"] == "initialize-timeout"
    await dashboard.aclose()


async def test_unknown_message_is_counted_and_reported(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    dashboard = SwarmDashboard(source)
    channel = channel_of(dashboard)
    channel.from_front_end({"action": "format_disk"})
    await signal.until(lambda: dashboard.status.get("error") is not None)
    assert dashboard.status["error"]["code"] == "unknown-action"
    assert dashboard.counters["rejected_messages"] == 1
    assert source.reinitialize_calls == 0
    await dashboard.aclose()


async def test_snapshot_failure_keeps_last_state_and_reports(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    class BrokenSource(ScriptedSource):
        broken = False

        def dashboard_snapshot(self) -> dict[str, Any]:
            if self.broken:
                raise KeyError("peers")
            return super().dashboard_snapshot()

    source = BrokenSource(signal, total_tasks=5)
    dashboard = SwarmDashboard(source, min_interval=0.0)
    source.broken = True
    source.notify()
    await signal.until(lambda: dashboard.status.get("error") is not None)
    assert dashboard.status["error"]["code"] == "snapshot-failed"
    assert dashboard.snapshot["total_tasks"] == 5
    await dashboard.aclose()


async def test_close_unsubscribes_and_cancels_reinitialize(
    front_end: list[RecordingComm], signal: Signal
) -> None:
    source = ScriptedSource(signal)
    source.gate = asyncio.Event()
    dashboard = SwarmDashboard(source, min_interval=0.0)
    channel = channel_of(dashboard)
    assert source.subscribers == 1
    channel.from_front_end({"action": "initialize"})
    await signal.until(lambda: dashboard.busy)

    await dashboard.aclose()
    assert source.subscribers == 0
    task = dashboard._reinitialize_task
    assert task is not None and task.cancelled()
    assert channel.messages[-1][0] == "comm_close"
    dashboard.close()  # closing twice is harmless


def test_display_snapshot_is_bounded_and_json_safe() -> None:
    limits = DisplayLimits(text_chars=20)
    snapshot = {
        "peers": [{"id": f"p{i}", "load": float("nan")} for i in range(250)],
        "capabilities": ("python-execution", "local-llm"),
        "latest_reflections": [{"description": "x" * 50}],
        "custom": {1: {2, 3}},
    }
    shown = display_snapshot(snapshot, limits)
    assert len(shown["peers"]) == 200
    assert shown["omitted"] == {"peers": 50}
    assert shown["peers"][0]["load"] is None
    assert shown["capabilities"] == ["python-execution", "local-llm"]
    assert shown["latest_reflections"][0]["description"] == "x" * 20 + "…"
    assert shown["custom"] == {"1": [2, 3]}


def test_static_asset_lookup(tmp_path: Path) -> None:
    assert static_asset("widget.js") == REPO / "js" / "widget.js"
    wheel_static = tmp_path / "static"
    wheel_static.mkdir()
    (wheel_static / "widget.js").write_text("export default {}")
    found = static_asset("widget.js", search_dirs=(wheel_static, REPO / "js"))
    assert found == wheel_static / "widget.js"
    with pytest.raises(SwarmError, match="missing-asset"):
        static_asset("widget.js", search_dirs=(tmp_path / "nowhere",))


@pytest.mark.parametrize(
    ("snapshot", "state", "message"),
    [
        ({"initialized": False, "connected_peers": 3}, "disabled", "Not initialized"),
        ({"initialized": True, "connected_peers": 0}, "idle", "No peers"),
        ({"initialized": True, "connected_peers": 2}, "active", None),
    ],
)
def test_dashboard_status_states(snapshot: dict[str, Any], state: str, message: str | None) -> None:
    status = dashboard_status(snapshot)
    assert status["state"] == state
    assert status["message"] == message
    assert status["primary_metric"] == f"{snapshot['connected_peers']} peers"


def test_dashboard_status_metrics_and_success_rate() -> None:
    snapshot = {
        "initialized": True,
        "connected_peers": 1,
        "total_tasks": 3,
        "tasks_completed": 2,
        "tasks_failed": 1,
        "last_activity": {"kind": "task", "timestamp": 1700000000.5},
    }
    status = dashboard_status(snapshot)
    assert status["secondary_metric"] == "3 tasks"
    assert status["last_activity"] == 1700000000.5
    assert status["success_rate"] == 67
    assert success_rate({"total_tasks": 0}) is None
    assert success_rate({"total_tasks": 4, "tasks_completed": 0, "tasks_failed": 4}) == 0
    assert dashboard_status({})["last_activity"] is None
