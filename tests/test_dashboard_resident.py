"""The dashboard's "Resident data" section: what the kernel sends about refs and the store.

The whole path: a notebook's ``Coordinator`` facade and a worker (real coordinators, a real
sandbox pool, over the in-memory network), a real ``SwarmDashboard`` and
``CoordinatorSource``; only the front end's comm is recorded. Values are put with
``c.put``, so every row comes from the owner's and the holder's own records.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from swarm_notebook.client import Coordinator
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.errors import RefError
from swarm_notebook.notebook.source import CoordinatorSource, peer_names, with_resident_data
from swarm_notebook.notebook.widget import SwarmDashboard
from swarm_notebook.reasons import Reason
from swarm_notebook.views.resident import RESIDENT_MAX_ROWS
from swarm_notebook.workload.executors.capabilities import ExecutorConfig
from swarm_notebook.workload.refs import OwnedRef, RefState
from tests.support.memory_facade import facade_and_worker
from tests.test_widget import RecordingComm, Signal, channel_of, front_end, signal  # noqa: F401

pytestmark = pytest.mark.timeout(90)

STORE_BYTES = 256 * 1024  # room for the small frames, not for the big one
WORKER_NAME = "holder-w0"


@pytest.fixture
async def facade(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, SwarmCoordinator]]:
    worker = CoordinatorConfig(
        name=WORKER_NAME,
        store_bytes=STORE_BYTES,
        executors=ExecutorConfig(python_execution=True, sandbox_size=1),
    )
    async with facade_and_worker(tmp_path, worker, "python-execution") as joined:
        yield joined


def resident(channel: RecordingComm) -> dict[str, Any]:
    """The newest resident-data section the front end received."""
    snapshots = [value for value, _at, _thread in channel.updates("snapshot")]
    if not snapshots:
        opened = next(data for kind, data, _at, _t in channel.messages if kind == "comm_open")
        snapshots = [opened["state"]["snapshot"]]
    section: dict[str, Any] = snapshots[-1]["resident_data"]
    return section


async def test_a_put_ref_reaches_the_panel_with_its_holder_by_name(
    facade: tuple[Coordinator, SwarmCoordinator],
    front_end: list[RecordingComm],  # noqa: F811
    signal: Signal,  # noqa: F811
) -> None:
    coordinator, worker = facade
    dashboard = SwarmDashboard(CoordinatorSource(coordinator), min_interval=0.05)
    channel = channel_of(dashboard)
    try:
        empty = resident(channel)
        # A notebook that does not run others' code holds nothing: no store block.
        assert (empty["refs"], empty["total"], empty["omitted"], empty["store"]) == ([], 0, 0, None)
        assert dashboard.states["ref"] == list(RefState)

        df = pd.DataFrame({"a": range(3), "b": [0.5, 1.5, 2.5]})
        ref = await coordinator.put(df)
        await signal.until(lambda: len(resident(channel)["refs"]) == 1, timeout=20)
        row = resident(channel)["refs"][0]
        assert row["ref_id"] == ref.ref_id and row["size"] == ref.size
        assert row["role"] == "owned" and row["state"] == RefState.HELD
        assert row["summary"] == "3 × 2 · a: int64, b: float64"
        assert row["holders"] == [{"peer": worker.local_id, "name": WORKER_NAME}]
        assert row["owner"] == {"peer": coordinator.peer_id, "name": "this peer"}
        shown = resident(channel)
        assert (shown["total"], shown["owned"], shown["owned_bytes"]) == (1, 1, ref.size)

        # refs_frame() has the same facts, holders by name and by id.
        frame = coordinator.refs_frame()
        assert frame.loc[0, "holder_names"] == WORKER_NAME
        assert frame.loc[0, "holder_ids"] == worker.local_id
        assert frame.loc[0, "state"] == "held" and frame.loc[0, "owner"] == coordinator.peer_id

        # Bounded: the newest rows, and how many more there are.
        refs = [ref]
        for i in range(RESIDENT_MAX_ROWS + 2):
            refs.append(await coordinator.put(pd.DataFrame({"a": [i]})))
        total = RESIDENT_MAX_ROWS + 3
        await signal.until(lambda: resident(channel)["total"] == total, timeout=20)
        shown = resident(channel)
        assert len(shown["refs"]) == RESIDENT_MAX_ROWS and shown["omitted"] == 3
        assert shown["refs"][0]["ref_id"] == refs[-1].ref_id  # newest first
        assert ref.ref_id not in {r["ref_id"] for r in shown["refs"]}

        await refs[-1].release()
        await signal.until(lambda: resident(channel)["total"] == total - 1, timeout=20)
        assert resident(channel)["refs"][0]["ref_id"] == refs[-2].ref_id
    finally:
        await dashboard.aclose()


async def test_the_holder_shows_its_store_use_and_refusals(
    facade: tuple[Coordinator, SwarmCoordinator],
) -> None:
    coordinator, worker = facade
    ref = await coordinator.put(pd.DataFrame({"a": range(100)}))
    with pytest.raises(RefError) as full:
        await coordinator.put(pd.DataFrame({"a": range(100_000)}))  # ~800 kB: over budget
    assert full.value.reason == Reason.STORE_FULL

    # The holder's panel, from its own records and stats (as its dashboard would read them).
    stats = worker.get_stats()
    snapshot = with_resident_data(stats, worker.ref_records(limit=RESIDENT_MAX_ROWS))
    section = snapshot["resident_data"]
    assert section["store"] == {
        "refs": 1,
        "memory_bytes": ref.size,
        "max_bytes": STORE_BYTES,
        "spilled_bytes": 0,
        "max_spill_bytes": 0,
        "spills": 0,
        "evicted": 0,
        "refused_full": 1,
        "refusals": 1,
    }
    (row,) = section["refs"]
    assert row["role"] == "held" and row["state"] == RefState.HELD
    assert row["owner"]["peer"] == coordinator.peer_id
    assert row["owner"]["name"] == peer_names(stats)[coordinator.peer_id]
    assert stats["refs"]["store"]["refusals"] == {"store-full": 1}

    await ref.release()
    after = with_resident_data(worker.get_stats(), worker.ref_records())["resident_data"]
    assert after["refs"] == [] and after["store"]["evicted"] == 1
    assert after["store"]["memory_bytes"] == 0


def test_a_ref_without_holders_is_local_and_a_kept_output_without_one_is_lost() -> None:
    put = OwnedRef("r1", 10, "d" * 32, "t", {}, b"x" * 10, holders=["W"])
    assert put.state == RefState.HELD
    put.holders.clear()  # its holder left: only the owner's copy remains
    assert put.state == RefState.LOCAL
    kept = OwnedRef("r2", 10, "d" * 32, "t", {}, None, holders=[], lost=True)
    assert kept.state == RefState.LOST
