"""Futures against real workers: submit, map, gather, as_completed, wait, cancel, executor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

import swarm_notebook
from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import RemoteTaskError, UsageError
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import WorkerProcess, start_workers

pytestmark = pytest.mark.timeout(300)


def column_total(df: pd.DataFrame, *, column: str) -> float:
    return float(math.fsum(df[column]))


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def ratio(a: float, b: float) -> float:
    scaled = a * 2
    return scaled / b


def spin_forever() -> None:
    while True:
        pass


async def capable(c: Coordinator, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(1 for p in c.get_stats()["peers"] if "python-execution" in p["capabilities"]) < n:
        assert time.monotonic() < deadline, "workers did not show up"
        await asyncio.sleep(0.05)


@pytest.fixture
async def swarm(server: SignalingServer, tmp_path: Path) -> Any:
    workers = await start_workers(server.url, "futures", tmp_path, 2, "--caps", "python-execution")
    c = await join("futures", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable(c, 2)
        yield c, workers
    finally:
        await c.leave()
        await asyncio.gather(*(w.stop() for w in workers))


async def test_submit_returns_a_future_that_knows_its_task_at_once(swarm: Any) -> None:
    c, workers = swarm
    df = pd.DataFrame({"v": [1.5, 2.5, 3.0]})
    called: list[concurrent.futures.Future[Any]] = []
    fut = c.submit(column_total, df, column="v")
    fut.add_done_callback(called.append)
    assert isinstance(fut, concurrent.futures.Future)
    assert len(fut.task_id) == 32
    assert await fut == 7.0
    assert fut.done() and fut.exception() is None and fut.result(timeout=1) == 7.0
    assert fut.peer in {w.peer_id for w in workers}
    assert fut.state == "completed"
    records = {r["id"]: r for r in c.task_records()}
    assert records[fut.task_id]["state"] == "completed"
    deadline = time.monotonic() + 5
    while not called:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert called == [fut]


async def test_a_remote_error_shows_the_users_code_and_is_not_retried(swarm: Any) -> None:
    c, workers = swarm
    fut = c.submit(ratio, 1.0, 0.0)
    with pytest.raises(RemoteTaskError) as caught:
        await fut
    err = caught.value
    assert err.error_type == "remote-exception"
    assert "ZeroDivisionError" in err.error
    assert "return scaled / b" in (err.remote_traceback or "")
    assert err.peer in {w.peer_id for w in workers}
    record = next(r for r in c.task_records() if r["id"] == fut.task_id)
    assert record["attempts"] == 1  # the user's own error is never run again elsewhere
    assert fut.state == "failed"


async def test_closures_are_refused_before_anything_is_sent(swarm: Any) -> None:
    c, _ = swarm
    offset = 3

    def shifted(x: int) -> int:
        return x + offset

    before = len(c.task_records())
    with pytest.raises(UsageError, match="offset"):
        c.submit(shifted, 1)
    assert len(c.task_records()) == before


async def test_map_gather_as_completed_and_wait(swarm: Any) -> None:
    c, workers = swarm
    futures = c.map(square, range(200), chunksize=20)
    assert len(futures) == 200
    assert len({f.task_id for f in futures}) == 10  # one task per chunk
    assert await asyncio.to_thread(c.gather, futures) == [x * x for x in range(200)]
    pairs = c.map(add, [1, 2, 3], [10, 20, 30])
    seen = [f async for f in swarm_notebook.as_completed(pairs)]
    assert sorted(f.result() for f in seen) == [11, 22, 33]
    done, not_done = swarm_notebook.wait(c.map(square, range(4), chunksize=1))
    assert {f.result() for f in done} == {0, 1, 4, 9} and not not_done
    ran_on = {f.peer for f in futures}
    assert ran_on <= {w.peer_id for w in workers}


def running(pid: int) -> bool:
    """Alive and not a zombie; a process that exits while we look is not running."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_cancel_kills_the_sandbox_process_and_is_not_retried(swarm: Any) -> None:
    c, workers = swarm
    fut = c.submit(spin_forever, retries=2)
    deadline = time.monotonic() + 20
    while fut.state != "working":
        assert time.monotonic() < deadline, f"task never started: {fut.state}"
        await asyncio.sleep(0.02)
    worker = next(w for w in workers if w.peer_id == fut.peer)
    busy = await busiest_descendant(worker)
    assert fut.cancel()
    canceled_at = time.monotonic()
    assert fut.cancelled() and fut.state == "canceled"
    while running(busy):
        assert time.monotonic() - canceled_at < 1.0, "the sandbox process outlived the cancel"
        await asyncio.sleep(0.01)
    record = await settled_record(c, fut.task_id)
    assert record["state"] == "canceled"
    assert record["attempts"] == 1  # nothing was retried after the cancel


async def test_executor_runs_code_written_for_executors(swarm: Any) -> None:
    c, _ = swarm

    def work(pool: concurrent.futures.Executor) -> list[int]:
        first = pool.submit(add, 2, 3)
        return [first.result(), *pool.map(square, range(5))]

    with c.executor() as pool:
        assert await asyncio.to_thread(work, pool) == [5, 0, 1, 4, 9, 16]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)


async def busiest_descendant(worker: WorkerProcess) -> int:
    """The pid of the worker's descendant that uses the most CPU right now."""
    procs = psutil.Process(worker.proc.pid).children(recursive=True)
    first = {p.pid: p.cpu_times().user for p in procs if p.is_running()}
    deadline = time.monotonic() + 5
    while True:
        await asyncio.sleep(0.2)
        gains = {}
        for p in procs:
            try:
                gains[p.pid] = p.cpu_times().user - first.get(p.pid, 0.0)
            except psutil.NoSuchProcess:
                continue
        pid, gain = max(gains.items(), key=lambda kv: kv[1])
        if gain > 0.05:
            return pid
        assert time.monotonic() < deadline, "no busy sandbox process found"


async def settled_record(c: Coordinator, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        record = next(r for r in c.task_records() if r["id"] == task_id)
        if record["state"] not in ("submitted", "working"):
            return record
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
