"""A swarm worker fronting a real Dask ``LocalCluster`` (2 worker processes), driven from a
notebook-side peer through a real signaling server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import RemoteTaskError, TaskRefused
from swarm_notebook.identity import Identity
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import WorkerProcess

pytestmark = pytest.mark.timeout(240)


def whose_pid(x: int) -> tuple[int, int]:
    import os

    return x * x, os.getpid()


def noisy_ratio(a: float, b: float) -> float:
    print("dividing", a, "by", b)
    scaled = a * 2
    return scaled / b


def nap(x: int, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return x + 1


def column_sum(df: Any, column: str) -> float:
    return float(df[column].sum())


def sleep_long() -> None:
    import time

    time.sleep(30)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class DaskSwarm:
    c: Coordinator
    worker: WorkerProcess
    dask: Any  # our own distributed.Client to the worker's scheduler


@pytest.fixture
async def dask_swarm(server: SignalingServer, tmp_path: Path) -> AsyncIterator[DaskSwarm]:
    me = Identity.load_or_create(tmp_path / "me").peer_id
    worker = await WorkerProcess.start(
        server.url, "dask", str(tmp_path / "dw"), "--dask", "local:2", "--allow", me,
        name="dask-worker", timeout=120,
    )  # fmt: skip
    c = await join("dask", signaling=server.url, profile=tmp_path / "me")
    dask = await Client(worker.fields["dask"], asynchronous=True)
    try:

        async def card_seen() -> bool:
            peers = c.get_stats()["peers"]
            return any(p["id"] == worker.peer_id and p["capabilities"] for p in peers)

        await until(card_seen, 60, "the Dask worker's card")
        yield DaskSwarm(c, worker, dask)
    finally:
        await dask.close()
        await c.leave()
        code = await worker.stop()
        assert code == 0, "".join(worker.stderr_lines[-30:])
        assert worker.problems() == [], "".join(worker.stderr_lines[-60:])


async def test_tasks_run_on_the_clusters_processes_and_look_like_a_plain_workers(
    dask_swarm: DaskSwarm, server: SignalingServer, tmp_path: Path
) -> None:
    c, worker, dask = dask_swarm.c, dask_swarm.worker, dask_swarm.dask
    cluster_pids = set((await dask.run(os.getpid)).values())
    assert len(cluster_pids) == 2 and worker.proc.pid not in cluster_pids

    # The card says what runs the code, and that it is not isolated; capacity is the
    # cluster's threads (2 workers x 1 thread).
    frame = c.peers_frame().set_index("peer_id")
    assert frame.loc[worker.peer_id, "backend"] == "dask"
    assert frame.loc[worker.peer_id, "isolation"] == "none"
    assert frame.loc[worker.peer_id, "concurrency"] == 2

    # submit: runs in a Dask worker process.
    value, pid = await c.submit(whose_pid, 7)
    assert value == 49 and pid in cluster_pids

    # map: one message per chunk, items spread over both Dask workers, results in order.
    futures = c.map(whose_pid, range(40), chunksize=20)
    results = c.gather(futures, timeout=60)
    assert [v for v, _ in results] == [i * i for i in range(40)]
    assert {p for _, p in results} == cluster_pids
    assert len({f.task_id for f in futures}) == 2

    # A remote error: the same traceback and output as from a sandboxed worker.
    fut = c.submit(noisy_ratio, 1.0, 0.0)
    with pytest.raises(RemoteTaskError) as caught:
        await fut
    assert caught.value.reason == "remote-exception"
    assert "ZeroDivisionError: float division by zero" in str(caught.value.remote_traceback)
    assert "return scaled / b" in str(caught.value.remote_traceback)
    assert fut.stdout == "dividing 1.0 by 0.0\n"
    record = c.task_record(fut.task_id)
    assert record is not None and record["attempts"] == 1 and record["backend_attempts"] == 1

    # A ref put on the Dask-backed peer becomes one scattered future on the cluster: the
    # tasks on it run on Dask workers without the frame being scattered again.
    import pandas as pd

    df = pd.DataFrame({"v": range(400_000)})
    ref = await c.put(df, peer=worker.peer_id)
    assert ref.holders == (worker.peer_id,)

    async def scattered_inputs() -> int:
        keys = [k for ks in (await dask.has_what()).values() for k in ks]
        return sum(1 for k in keys if str(k).startswith("dict-"))

    assert await c.submit(column_sum, ref, "v") == float(df.v.sum())
    assert await scattered_inputs() == 1
    assert await c.submit(column_sum, ref, "v") == float(df.v.sum())
    assert await scattered_inputs() == 1
    assert (await ref.fetch()).equals(df)

    # A delegator not on the allowlist is refused, with the reason.
    stranger = await join("dask", signaling=server.url, profile=tmp_path / "stranger")
    try:

        async def stranger_sees_it() -> bool:
            return any(p["id"] == worker.peer_id and p["capabilities"]
                       for p in stranger.get_stats()["peers"])  # fmt: skip

        await until(stranger_sees_it, 60, "the stranger to see the Dask worker")
        with pytest.raises(TaskRefused) as refused:
            await stranger.submit(whose_pid, 1, peer=worker.peer_id)
        assert refused.value.reason == Reason.NOT_ON_ALLOWLIST
    finally:
        await stranger.leave()

    # Cancel reaches Dask: the scheduler forgets the running task at once (it would
    # otherwise process it for 30 s).
    fut = c.submit(sleep_long)

    async def running() -> bool:
        return any((await dask.processing()).values())

    await until(running, 30, "the task to run on Dask")
    assert fut.cancel()

    async def forgotten() -> bool:
        return not any((await dask.processing()).values())

    await until(forgotten, 10, "Dask to drop the cancelled task")


async def test_a_dask_worker_killed_mid_map_loses_nothing(dask_swarm: DaskSwarm) -> None:
    c, dask = dask_swarm.c, dask_swarm.dask
    pids = await dask.run(os.getpid)
    futures = c.map(nap, range(24), [0.2] * 24, chunksize=8)

    async def busy_worker() -> str | None:
        processing = await dask.processing()
        return next((w for w, keys in processing.items() if keys), None)

    async def some_worker_busy() -> bool:
        return await busy_worker() is not None

    await until(some_worker_busy, 30, "the map to run on Dask")
    victim = await busy_worker()
    assert victim is not None
    os.kill(pids[victim], signal.SIGKILL)
    results = c.gather(futures, timeout=120)
    assert results == [i + 1 for i in range(24)]
    attempts = [c.task_record(f.task_id)["backend_attempts"] for f in {f.chunk for f in futures}]
    assert max(attempts) >= 2, attempts  # Dask ran the lost part again elsewhere

    # The card follows the cluster's size: retire a worker, and the room sees 1 thread.
    async def two_workers() -> bool:
        return len(await dask.nthreads()) == 2

    await until(two_workers, 60, "the nanny to restart the killed worker")
    await dask.retire_workers([next(iter(await dask.nthreads()))], close_workers=True)

    async def card_says_one() -> bool:
        peer = next(p for p in c.get_stats()["peers"] if p["id"] == dask_swarm.worker.peer_id)
        return bool(peer["concurrency"] == 1)

    await until(card_says_one, 30, "the card to advertise the smaller cluster")
