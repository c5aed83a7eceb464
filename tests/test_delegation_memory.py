"""Delegation semantics on the in-memory transport (unit level; real peers: test_delegation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.errors import DelegationError
from swarm_notebook.identity import Identity
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport
from swarm_notebook.workload.executors.capabilities import ExecutorConfig


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

    # A request over the link's message limit: a clear error, and the record is closed.
    with pytest.raises(DelegationError) as err:
        await asker.delegate_task("file-analysis", {"path": "a" * 200_000})
    assert err.value.reason == "too-large"
    # Nobody offers git-vfs: the reason names the capability.
    with pytest.raises(DelegationError) as err:
        await asker.delegate_task("git-operation", {"op": "log"})
    assert err.value.reason == "no-capable-peer" and "git-vfs" in str(err.value)

    records = asker.task_records()
    assert [r["state"] for r in records] == ["completed", "rejected", "rejected"]
    assert all(r["finished_at"] is not None for r in records)
    stats = asker.get_stats()
    assert (stats["total_tasks"], stats["tasks_completed"], stats["tasks_failed"]) == (3, 1, 2)


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
        with pytest.raises(DelegationError) as err:
            await alone.delegate_task("file-analysis", {"path": "b.csv"})
        assert err.value.reason == "no-capable-peer"
        alone.config.delegation.run_locally_when_alone = True
        result = await alone.delegate_task("file-analysis", {"path": "b.csv"})
        assert result["success"] and result["peer"] == alone.local_id
        assert result["analysis"]["type"] == "csv"
    finally:
        await alone.leave()
