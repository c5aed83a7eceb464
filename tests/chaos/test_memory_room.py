"""A 200-peer room on the in-memory transport: membership, delegation and consensus.

Real ``SwarmCoordinator``s (signed agent cards, real executors, SQLite audit and
reflection stores, signed proposals and ballots) on one loop; only the network is the
in-memory twin (1 ms latency). Reports time and messages per peer for each phase.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.governance.service import ConsensusConfig
from swarm_notebook.identity import Identity
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from tests.chaos.helpers import wait_until
from tests.support.procs import child_processes

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

PEERS = 200
FILE_PEERS = 20  # offer file-analysis on a tiny workspace
PYTHON_PEERS = 2  # offer python-computation with a one-child sandbox pool
DELEGATORS = 10
FILE_TASKS = 200
PYTHON_TASKS = 20


def message_counts(peers: list[SwarmCoordinator]) -> list[int]:
    return [
        sum(p.node.endpoint.sent.values()) + sum(p.node.endpoint.received.values()) for p in peers
    ]


def per_peer(before: list[int], after: list[int]) -> str:
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    return f"mean {statistics.mean(diffs):.0f}, max {max(diffs)} messages per peer"


async def test_200_peer_room_converges_delegates_and_decides(tmp_path: Path) -> None:
    net = MemoryNetwork(latency_s=0.001, seed=7)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "data.csv").write_text("a,b\n1,2\n3,4\n")

    def config_for(i: int) -> CoordinatorConfig:
        if i < FILE_PEERS:
            return CoordinatorConfig(
                room="big",
                capabilities=["file-management"],
                executors=ExecutorConfig(workspace=workspace),
            )
        if i < FILE_PEERS + PYTHON_PEERS:
            return CoordinatorConfig(
                room="big",
                capabilities=["python-execution"],
                executors=ExecutorConfig(
                    python_execution=True, sandbox_size=1, sandbox_memory_limit_mb=512
                ),
            )
        return CoordinatorConfig(
            room="big",
            capabilities=[],
            # Everyone must vote for this proposal to pass: all 199 ballots are counted.
            consensus=ConsensusConfig(timeout_s=60, quorum="unanimous"),
        )

    peers: list[SwarmCoordinator] = []
    started = time.monotonic()
    try:
        for i in range(PEERS):
            identity = Identity.generate()
            peer = SwarmCoordinator(
                identity,
                MemoryTransport(identity, net, "big"),
                config_for(i),
                tmp_path / f"p{i}",
                EventBus(),
            )
            peers.append(peer)
            await peer.start()

        def converged() -> bool:
            return all(
                len(p.node.connected_peers()) == PEERS - 1 and len(p.node.candidates()) == PEERS - 1
                for p in peers
            )

        await wait_until(converged, 120, f"every peer to see {PEERS - 1} peers with cards")
        membership_s = time.monotonic() - started
        after_membership = message_counts(peers)
        for p in peers:
            capable = Counter(c for cand in p.node.candidates() for c in cand.capabilities)
            own = set(p.node.capabilities)
            assert capable["file-management"] == FILE_PEERS - ("file-management" in own)
            assert capable["python-execution"] == PYTHON_PEERS - ("python-execution" in own)

        # Delegation: several delegators (none of them capable) at once.
        delegators = peers[-DELEGATORS:]
        started = time.monotonic()
        file_results, python_results = await asyncio.gather(
            asyncio.gather(
                *(
                    delegators[i % DELEGATORS].delegate_task(
                        "file-analysis", {"path": "data.csv"}, timeout=60
                    )
                    for i in range(FILE_TASKS)
                )
            ),
            asyncio.gather(
                *(
                    delegators[i % DELEGATORS].delegate_task(
                        "python-computation", {"code": f"{i} * 3"}, timeout=60
                    )
                    for i in range(PYTHON_TASKS)
                )
            ),
        )
        delegation_s = time.monotonic() - started
        after_delegation = message_counts(peers)
        assert all(r["success"] and r["analysis"]["lines"] == 4 for r in file_results)
        assert [r["value"] for r in python_results] == [i * 3 for i in range(PYTHON_TASKS)]
        file_peers = {p.local_id for p in peers[:FILE_PEERS]}
        ran_on = Counter(r["peer"] for r in file_results)
        assert set(ran_on) <= file_peers and len(ran_on) >= FILE_PEERS // 2, ran_on
        served = sum(p.stats.tasks_served for p in peers)
        assert served == FILE_TASKS + PYTHON_TASKS
        assert sum(p.stats.tasks_completed for p in delegators) == FILE_TASKS + PYTHON_TASKS

        # Consensus: one proposal put to all 199 other peers, unanimous quorum.
        proposer = peers[-1]
        results: list[dict[str, Any]] = []
        proposer.events.on("swarm:consensus-result", results.append)
        started = time.monotonic()
        result = await proposer.consensus.request_modification_consensus(
            {
                "file_path": "analysis/clean.py",
                "code": "df = df.dropna()",
                "operation": "MODIFY",
                "reason": "drop empty rows",
            }
        )
        consensus_s = time.monotonic() - started
        after_consensus = message_counts(peers)
        assert result["consensus"] is True and result["reason"] == "approved", result
        assert result["approve_count"] == PEERS - 1 and result["missing"] == []
        assert len(result["ballots"]) == PEERS - 1
        assert len(results) == 1
        cast = sum(1 for p in peers[:-1] for _ in p.audit.rows("ballot-cast", limit=10))
        assert cast == PEERS - 1

        rejections: Counter[str] = Counter()
        for p in peers:
            rejections.update(p.rejections())
        assert rejections == Counter(), rejections
        print(
            f"\n[chaos] {PEERS}-peer memory room: membership converged in {membership_s:.1f} s "
            f"({per_peer([0] * PEERS, after_membership)}); "
            f"{FILE_TASKS} file-analysis + {PYTHON_TASKS} python tasks from {DELEGATORS} "
            f"delegators on {len(ran_on)}+{PYTHON_PEERS} peers in {delegation_s:.1f} s "
            f"({per_peer(after_membership, after_delegation)}); unanimous consensus of "
            f"{PEERS - 1} voters in {consensus_s:.2f} s "
            f"({per_peer(after_delegation, after_consensus)}); network delivered "
            f"{net.delivered}, dropped {net.dropped}"
        )
    finally:
        for peer in peers:
            await peer.leave()
    assert child_processes() == []
