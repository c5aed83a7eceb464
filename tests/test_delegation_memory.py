"""Delegation semantics on the in-memory transport (unit level; real peers: test_delegation)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.errors import (
    AttemptsExhausted,
    DelegationError,
    DelegationTimeout,
    NoCapablePeerError,
    NotJoinedError,
    TaskInputError,
    TaskRefused,
    UnknownTaskTypeError,
)
from swarm_notebook.identity import Identity
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport
from swarm_notebook.views.status import success_rate
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from swarm_notebook.workload.policy import TaskPolicy


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SwarmCoordinator, SwarmCoordinator]]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("x\ny\n")
    net = MemoryNetwork()
    peers = []
    for name, cfg in (
        ("asker", CoordinatorConfig()),
        ("files", CoordinatorConfig(executors=ExecutorConfig(workspace=workspace))),
    ):
        identity = Identity.generate()
        transport = MemoryTransport(identity, net, "room", max_message_bytes=100_000)
        peers.append(SwarmCoordinator(identity, transport, cfg, tmp_path / name, EventBus()))
    for p in peers:
        await p.start()
    yield peers[0], peers[1]
    for p in peers:
        await p.leave()


async def test_every_failure_ends_the_task_record_exactly_once(
    pair: tuple[SwarmCoordinator, SwarmCoordinator],
) -> None:
    asker, files = pair
    ok = await asker.delegate_task("file-analysis", {"path": "a.txt"})
    assert ok["success"] and ok["peer"] == files.local_id

    # A request over the link's message limit: refused here, before any peer saw it, so a
    # UsageError (the caller's to fix); the record is closed.
    with pytest.raises(TaskInputError) as bad:
        await asker.delegate_task("file-analysis", {"path": "a" * 200_000})
    assert bad.value.reason == "too-large"
    # Nobody offers git-vfs: the reason names the capability.
    with pytest.raises(NoCapablePeerError) as err:
        await asker.delegate_task("git-operation", {"op": "log"})
    assert err.value.reason == "no-capable-peer" and "git-vfs" in str(err.value)

    records = asker.task_records()
    assert [r["state"] for r in records] == ["completed", "rejected", "rejected"]
    assert all(r["finished_at"] is not None for r in records)
    stats = asker.get_stats()
    assert (stats["total_tasks"], stats["tasks_completed"], stats["tasks_failed"]) == (3, 1, 2)
    # Neither failure left this peer: they do not count against the swarm's success rate.
    assert stats["tasks_not_sent"] == 2
    assert success_rate(stats) == 100


async def test_local_fallback_is_off_by_default_and_works_when_enabled(tmp_path: Path) -> None:
    identity = Identity.generate()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "b.csv").write_text("1,2\n")
    cfg = CoordinatorConfig(executors=ExecutorConfig(workspace=workspace))
    alone = SwarmCoordinator(
        identity,
        MemoryTransport(identity, MemoryNetwork(), "solo"),
        cfg,
        tmp_path / "alone",
        EventBus(),
    )
    await alone.start()
    try:
        with pytest.raises(NoCapablePeerError) as err:
            await alone.delegate_task("file-analysis", {"path": "b.csv"})
        assert err.value.reason == "no-capable-peer"
        alone.config.delegation.run_locally_when_alone = True
        result = await alone.delegate_task("file-analysis", {"path": "b.csv"})
        assert result["success"] and result["peer"] == alone.local_id
        assert result["analysis"]["type"] == "csv"
    finally:
        await alone.leave()


# -- the failure rule (client.Coordinator.delegate_task), one branch at a time ---------
#
# returns: a peer ran the task and reported (success, or the user's own error);
# raises DelegationError: no peer could run it; raises UsageError: misuse caught here.


@asynccontextmanager
async def swarm_of(
    tmp_path: Path, configs: dict[str, CoordinatorConfig]
) -> AsyncIterator[dict[str, SwarmCoordinator]]:
    """In-memory peers in one room, started and settled (every card seen)."""
    net = MemoryNetwork()
    peers: dict[str, SwarmCoordinator] = {}
    for name, cfg in configs.items():
        identity = Identity.generate()
        transport = MemoryTransport(identity, net, "room", max_message_bytes=100_000)
        peers[name] = SwarmCoordinator(identity, transport, cfg, tmp_path / name, EventBus())
    try:
        for p in peers.values():
            await p.start()
        for p in peers.values():
            assert await p.settle(10) == []
        yield peers
    finally:
        for p in peers.values():
            await p.leave()


def files_config(workspace: Path, **policy: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        executors=ExecutorConfig(workspace=workspace), policy=TaskPolicy(**policy)
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "a.txt").write_text("x\ny\n")
    return path


async def test_results_come_back_refusals_and_misuse_raise(tmp_path: Path, workspace: Path) -> None:
    configs = {
        "asker": CoordinatorConfig(),
        "files": files_config(workspace),
        "strict": files_config(workspace, allowed_peers=frozenset()),  # refuses everyone
    }
    async with swarm_of(tmp_path, configs) as p:
        asker, files, strict = p["asker"], p["files"], p["strict"]
        # Returned: the peer ran it (the strict peer's refusal only costs an attempt).
        ok = await asker.delegate_task("file-analysis", {"path": "a.txt"})
        assert ok["success"] and ok["peer"] == files.local_id
        outside = await asker.delegate_task("file-analysis", {"path": "../etc/passwd"})
        assert outside["success"] is False and outside["error_type"] == "path-outside-workspace"
        assert outside["peer"] == files.local_id and outside["error"]

        # Raised TaskRefused: the executor refused the input before running it; every
        # peer would, so no retry, and the record says rejected.
        with pytest.raises(TaskRefused) as refused:
            await asker.delegate_task("file-analysis", {"path": 5})
        assert refused.value.reason == Reason.BAD_INPUT and refused.value.peer == files.local_id
        assert isinstance(refused.value, DelegationError)
        assert files.rejections().get("bad-input") == 1
        # Raised TaskRefused: the one peer the task was pinned to refused it (policy).
        with pytest.raises(TaskRefused) as pinned:
            await asker.delegate_task("file-analysis", {"path": "a.txt"}, peer=strict.local_id)
        assert pinned.value.reason == Reason.NOT_ALLOWED and pinned.value.peer == strict.local_id

        # Raised UsageError: caught here, no peer asked.
        sent_before = files.get_stats()["tasks_served"] + len(strict.task_server.refusals)
        with pytest.raises(UnknownTaskTypeError):
            await asker.delegate_task("file-analyses", {"path": "a.txt"})
        with pytest.raises(TaskInputError) as zero:
            await asker.delegate_task("file-analysis", {"path": "a.txt"}, timeout=0)
        assert zero.value.reason == Reason.BAD_ARGUMENTS
        with pytest.raises(TaskInputError) as unsendable:
            await asker.delegate_task("file-analysis", {"path": object()})
        assert unsendable.value.reason == Reason.UNSUPPORTED_TYPE
        assert files.get_stats()["tasks_served"] + len(strict.task_server.refusals) == sent_before

        states = [r["state"] for r in asker.task_records()]
        assert states == ["completed", "failed", "rejected", "rejected", "rejected"]
        await asker.leave()
        with pytest.raises(NotJoinedError) as left:
            await asker.delegate_task("file-analysis", {"path": "a.txt"})
        assert left.value.reason == Reason.NOT_INITIALIZED


async def test_policy_refusal_by_every_peer_exhausts_the_attempts(
    tmp_path: Path, workspace: Path
) -> None:
    configs = {
        "asker": CoordinatorConfig(),
        "strict1": files_config(workspace, allowed_peers=frozenset()),
        "strict2": files_config(workspace, allowed_peers=frozenset()),
    }
    async with swarm_of(tmp_path, configs) as p:
        with pytest.raises(AttemptsExhausted) as err:
            await p["asker"].delegate_task("file-analysis", {"path": "a.txt"})
        assert err.value.reason == Reason.ATTEMPTS_EXHAUSTED
        assert len(err.value.failures) == 2
        assert all("not-allowed" in failure for failure in err.value.failures)
        assert [r["state"] for r in p["asker"].task_records()] == ["rejected"]


async def test_user_errors_return_and_no_room_in_time_raises(tmp_path: Path) -> None:
    configs = {
        "asker": CoordinatorConfig(),
        # One slot, no queue: a second task finds no room until the first ends.
        "py": CoordinatorConfig(
            executors=ExecutorConfig(python_execution=True, sandbox_size=1),
            concurrency=1,
            max_queue=0,
        ),
    }
    async with swarm_of(tmp_path, configs) as p:
        asker, py = p["asker"], p["py"]
        boom = await asker.delegate_task("python-computation", {"code": "1 / 0"})
        assert boom["success"] is False and "ZeroDivisionError" in boom["error"]
        assert boom["traceback"] and boom["peer"] == py.local_id

        with pytest.raises(TaskInputError) as unsendable:
            await asker.delegate_task(
                "python-computation", {"code": "x", "inputs": {"x": object()}}
            )
        assert unsendable.value.reason == Reason.UNSUPPORTED_TYPE
        with pytest.raises(TaskInputError) as shape:
            await asker.delegate_task("python-computation", {"code": "x", "inputs": [1]})
        assert shape.value.reason == Reason.BAD_INPUT

        working = asyncio.Event()
        asker.events.on("task:working", lambda _payload: working.set())
        slow = asyncio.create_task(
            asker.delegate_task(
                "python-computation", {"code": "import time\ntime.sleep(3)\n7"}, timeout=30
            )
        )
        await asyncio.wait_for(working.wait(), 20)
        with pytest.raises(DelegationTimeout) as late:
            await asker.delegate_task("python-computation", {"code": "1"}, timeout=0.5)
        assert isinstance(late.value, TimeoutError) and late.value.reason == Reason.TIMEOUT
        assert (await slow)["value"] == 7
        # In submission order: the slow task, then the one that found no room.
        assert [r["state"] for r in asker.task_records()][-2:] == ["completed", "failed"]


async def test_a_local_refusal_raises_like_a_peers(tmp_path: Path, workspace: Path) -> None:
    cfg = files_config(workspace)
    cfg.delegation.run_locally_when_alone = True
    async with swarm_of(tmp_path, {"alone": cfg}) as p:
        alone = p["alone"]
        with pytest.raises(TaskRefused) as err:
            await alone.delegate_task("file-analysis", {"path": 5})
        assert err.value.reason == Reason.BAD_INPUT and err.value.peer == alone.local_id


class CrashingExecutor:
    """A file-analysis executor with a bug in it (our code, not the user's)."""

    task_type = "file-analysis"

    def __init__(self) -> None:
        self.runs = 0
        self.closes = 0

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        self.runs += 1
        raise KeyError("a bug in the executor")

    async def close(self) -> None:
        self.closes += 1


async def test_an_executor_crash_is_retried_on_another_peer_but_a_user_error_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("x\ny\n")
    serving = CoordinatorConfig(
        executors=ExecutorConfig(workspace=workspace, python_execution=True, sandbox_size=1)
    )
    net = MemoryNetwork()
    peers = []
    for name, cfg in (("asker", CoordinatorConfig()), ("buggy", serving), ("sound", serving)):
        identity = Identity.generate()
        transport = MemoryTransport(identity, net, "room")
        peers.append(SwarmCoordinator(identity, transport, cfg, tmp_path / name, EventBus()))
    asker, buggy, sound = peers
    for p in peers:
        await p.start()
    crashing = CrashingExecutor()
    await buggy.executors["file-analysis"].close()
    buggy.executors["file-analysis"] = crashing
    try:
        # Routing is random among idle peers: delegate until the buggy peer was tried first.
        results = []
        while crashing.runs == 0 and len(results) < 40:
            results.append(await asker.delegate_task("file-analysis", {"path": "a.txt"}))
        assert crashing.runs >= 1, "the buggy peer was never chosen"
        assert all(r["success"] and r["peer"] == sound.local_id for r in results)
        retried = [r for r in results if r["attempts"] == 2]
        assert len(retried) == crashing.runs
        assert buggy.task_server.refusals["internal-error"] == crashing.runs
        served = [r for r in buggy.task_records() if r["role"] == "served"]
        assert served and all(
            r["state"] == "failed" and r["error"].startswith("internal-error") for r in served
        )
        crash_logs = [r for r in caplog.records if "crashed on task" in r.getMessage()]
        assert crash_logs and all(r.exc_info for r in crash_logs), "logged with its traceback"

        # The user's own exception is a result, reported once, on the first peer tried.
        user = await asker.delegate_task("python-computation", {"code": "raise ValueError('mine')"})
        assert not user["success"] and user["error_type"] == "remote-exception"
        assert user["attempts"] == 1 and "mine" in user["error"]
        python_served = [
            r
            for p in (buggy, sound)
            for r in p.task_records()
            if r["role"] == "served" and r["type"] == "python-computation"
        ]
        assert len(python_served) == 1
    finally:
        for p in peers:
            await p.leave()
    # The coordinator owns its executors and closes each one once.
    assert crashing.closes == 1
