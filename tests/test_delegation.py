"""Delegation between real peers: this process is the notebook, workers are CLI processes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import (
    NoCapablePeerError,
    TaskRefused,
    UnknownTaskTypeError,
    UsageError,
)
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.workload.messages import TASK_STATUS
from tests.support.procs import WorkerProcess, child_processes, start_workers

pytestmark = pytest.mark.timeout(300)

PY_CAPS = ("--caps", "python-execution")


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def capable_peers(c: Coordinator, n: int, cap: str = "python-execution") -> None:
    def ready() -> bool:
        peers = c.get_stats()["peers"]
        return sum(1 for p in peers if p["state"] == "connected" and cap in p["capabilities"]) >= n

    await wait_until(ready, 30, f"{n} peers offering {cap}")


async def stop_workers(workers: list[WorkerProcess]) -> None:
    codes = await asyncio.gather(*(w.stop() for w in workers))
    for w, code in zip(workers, codes, strict=True):
        if code != -9:
            assert code == 0, f"{w.name} exited {code}: {''.join(w.stderr_lines[-20:])}"
            assert w.problems() == [], w.problems()


async def test_blueprint_checklist_and_load_balance(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "r1", tmp_path, 2, *PY_CAPS)
    sockets_before = {conn.laddr for conn in psutil.Process().net_connections(kind="inet")}
    tasks_before = asyncio.all_tasks()
    c = await join("r1", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 2)
        stats = c.get_stats()
        assert stats["connected_peers"] == 2 and stats["total_peers"] == 2
        assert {p["id"] for p in stats["peers"]} == {w.peer_id for w in workers}
        assert all(p["capabilities"] == ["python-execution"] for p in stats["peers"])
        # We never opted in to run others' code, so we do not offer it.
        assert "python-execution" not in stats["capabilities"]

        # Initialising twice registers handlers once: one reply, one completion event.
        handlers_before = c._core.node.endpoint.handler_types()
        await c.init()
        await c.init()
        assert c._core.node.endpoint.handler_types() == handlers_before
        completions: list[dict[str, Any]] = []
        c.on("task:completed", completions.append)
        result = await c.delegate_task("python-computation", {"code": "print('hi')\n6 * 7"})
        assert result["success"] and result["value"] == 42 and result["stdout"] == "hi\n"
        assert result["peer"] in {w.peer_id for w in workers}
        await wait_until(lambda: len(completions) == 1, 5, "completion event")
        assert completions[0]["id"] == result["task_id"]  # correlation id end to end
        await asyncio.sleep(0.2)
        assert len(completions) == 1

        # 200 tasks over 2 workers land roughly evenly.
        results = await asyncio.gather(
            *(c.delegate_task("python-computation", {"code": f"{i} * 2"}) for i in range(200))
        )
        assert [r["value"] for r in results] == [i * 2 for i in range(200)]
        per_peer = Counter(r["peer"] for r in results)
        assert len(per_peer) == 2 and min(per_peer.values()) >= 70, per_peer
        stats = c.get_stats()
        assert stats["total_tasks"] == 201 and stats["tasks_completed"] == 201
        assert stats["tasks_failed"] == 0
        rows = c.audit_rows("delegation-sent", limit=500)
        assert len(rows) == 201

        # get_stats follows a peer leaving.
        await workers[1].stop()
        await wait_until(lambda: c.get_stats()["connected_peers"] == 1, 10, "peer count drop")
    finally:
        await c.leave()
        await stop_workers(workers)
    assert child_processes() == []
    # leave() left nothing behind in this process: no network thread, socket or task.
    assert not [t for t in threading.enumerate() if t.name.startswith("swarm-notebook")]
    await wait_until(
        lambda: (
            {
                conn.laddr
                for conn in psutil.Process().net_connections(kind="inet")
                if conn.status != psutil.CONN_TIME_WAIT
            }
            <= sockets_before
        ),
        5,
        "sockets to close",
    )
    assert asyncio.all_tasks() - tasks_before == {asyncio.current_task()} - tasks_before


async def test_worker_killed_mid_task_completes_elsewhere_once(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "r2", tmp_path, 2, *PY_CAPS)
    by_id = {w.peer_id: w for w in workers}
    c = await join("r2", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 2)
        working: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        ended: list[dict[str, Any]] = []
        c.on("task:working", working.put_nowait)
        for event in ("task:completed", "task:failed", "task:canceled", "task:rejected"):
            c.on(event, ended.append)
        code = "import time\ntime.sleep(2)\n'done'"
        task = asyncio.create_task(
            c.delegate_task("python-computation", {"code": code}, timeout=30)
        )
        first = await asyncio.wait_for(working.get(), 20)
        by_id[first["peer"]].kill()
        result = await asyncio.wait_for(task, 60)
        assert result["success"] and result["value"] == "done"
        assert result["attempts"] == 2 and result["peer"] != first["peer"]
        await asyncio.sleep(0.3)
        assert [e["id"] for e in ended] == [result["task_id"]]  # reported exactly once
    finally:
        await c.leave()
        await stop_workers(workers)


async def test_bad_tasks_end_with_clear_errors_and_worker_keeps_serving(
    server: SignalingServer, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "data.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "secret.txt").write_text("owner's secret")
    (workspace / "escape").symlink_to(tmp_path / "secret.txt")
    worker = await WorkerProcess.start(
        server.url,
        "r3",
        str(tmp_path / "w0"),
        "--caps",
        "python-execution,file-management",
        "--workspace",
        str(workspace),
        "--max-input-mb",
        "1",
        "--memory-limit-mb",
        "600",
        name="w0",
    )
    strict = await WorkerProcess.start(
        server.url,
        "r3",
        str(tmp_path / "w1"),
        "--caps",
        "python-execution",
        "--allow-from",
        worker.peer_id,
        name="strict",
    )
    c = await join("r3", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 2)
        await capable_peers(c, 1, "file-management")
        ok = await c.delegate_task("file-analysis", {"path": "data.csv"})
        assert ok["success"] and ok["analysis"]["lines"] == 4 and ok["analysis"]["type"] == "csv"
        for path in ("../secret.txt", "/etc/passwd", "escape"):
            bad = await c.delegate_task("file-analysis", {"path": path})
            assert not bad["success"] and bad["error_type"] == "path-outside-workspace", bad

        with pytest.raises(UnknownTaskTypeError) as unknown:
            await c.delegate_task("quantum-computation", {})
        assert isinstance(unknown.value, UsageError)
        assert unknown.value.reason == "unknown-task-type" and "python-computation" in str(
            unknown.value
        )

        # The strict worker refuses us; the task lands on the other worker.
        for _ in range(4):
            r = await c.delegate_task("python-computation", {"code": "1"})
            assert r["peer"] == worker.peer_id
        with pytest.raises(TaskRefused) as err:
            await c.delegate_task("python-computation", {"code": "1"}, peer=strict.peer_id)
        assert err.value.reason == "not-allowed" and err.value.peer == strict.peer_id

        with pytest.raises(TaskRefused) as err:
            await c.delegate_task(
                "python-computation",
                {"code": "len(x)", "inputs": {"x": "y" * 2_000_000}},
                peer=worker.peer_id,
            )
        assert err.value.reason == "too-large"
        # The sandbox refuses a malformed task before running it: a refusal (raised, not a
        # result), the same on every peer, so it ends at once as one rejected task.
        failed_before = c.get_stats()["tasks_failed"]
        with pytest.raises(TaskRefused) as err:
            await c.delegate_task("python-computation", {"code": "1", "outputs": ["not a name"]})
        assert err.value.reason == "bad-input" and "identifier" in err.value.message
        assert err.value.peer == worker.peer_id  # the strict worker refuses with not-allowed
        assert c.get_stats()["tasks_failed"] == failed_before + 1
        assert c.task_records()[-1]["state"] == "rejected"

        forever = await c.delegate_task(
            "python-computation", {"code": "while True:\n    pass"}, timeout=2, peer=worker.peer_id
        )
        assert not forever["success"] and forever["error_type"] == "timeout"
        hog = await c.delegate_task(
            "python-computation",
            {"code": "x = []\nwhile True:\n    x.append(bytearray(50_000_000))"},
            timeout=30,
            peer=worker.peer_id,
        )
        assert not hog["success"] and hog["error_type"] == "memory-limit", hog
        boom = await c.delegate_task(
            "python-computation", {"code": "a = 1\nb = 0\na / b"}, peer=worker.peer_id
        )
        assert not boom["success"] and "ZeroDivisionError" in boom["error"]
        assert "a / b" in boom["traceback"] and "line 3" in boom["traceback"]
        after = await c.delegate_task(
            "python-computation", {"code": "sum(range(10))"}, peer=worker.peer_id
        )
        assert after["success"] and after["value"] == 45
        assert c.get_stats()["tasks_failed"] >= 3
    finally:
        await c.leave()
        await stop_workers([worker, strict])


async def test_dataframe_round_trip_and_graceful_shutdown(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "r4", tmp_path, 2, *PY_CAPS, "--grace", "1")
    c = await join("r4", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 2)
        n = 25_000
        df = pd.DataFrame(
            {
                "i": np.arange(n, dtype="int64"),
                "f": np.linspace(0, 1, n),
                "s": pd.Series([f"row{i}" for i in range(n)], dtype="string"),
                "cat": pd.Categorical(["a", "b", "c", "d"] * (n // 4)),
                "t": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
            },
            index=pd.Index(np.arange(n) * 3, name="key"),
        )
        assert df.memory_usage(deep=True).sum() > 1_000_000
        r = await c.delegate_task(
            "python-computation",
            {"code": "out = df.copy()\nout", "inputs": {"df": df}, "outputs": ["out"]},
        )
        assert r["success"], r
        pd.testing.assert_frame_equal(r["value"], df)
        pd.testing.assert_frame_equal(r["outputs"]["out"], df)

        # SIGTERM mid-task: the worker hands the task back and exits 0; it completes elsewhere.
        working: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        c.on("task:working", working.put_nowait)
        task = asyncio.create_task(
            c.delegate_task(
                "python-computation", {"code": "import time\ntime.sleep(4)\n7"}, timeout=30
            )
        )
        first = await asyncio.wait_for(working.get(), 20)
        leaving = next(w for w in workers if w.peer_id == first["peer"])
        assert await leaving.stop() == 0
        result = await asyncio.wait_for(task, 60)
        assert result["success"] and result["value"] == 7 and result["peer"] != leaving.peer_id
        assert result["attempts"] == 2
    finally:
        await c.leave()
        await stop_workers(workers)
    assert child_processes() == []


async def test_cancel_reaches_the_worker_and_missing_capability_is_explained(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(
        server.url, "r5", str(tmp_path / "w0"), *PY_CAPS, "--concurrency", "1", name="w0"
    )
    c = await join("r5", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 1)
        working: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        c.on("task:working", working.put_nowait)
        long = asyncio.create_task(
            c.delegate_task(
                "python-computation", {"code": "import time\ntime.sleep(60)"}, timeout=90
            )
        )
        started = await asyncio.wait_for(working.get(), 20)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        record = next(r for r in c.task_records() if r["id"] == started["id"])
        assert record["state"] == "canceled"
        # The worker's only slot is free again at once: the remote sleep was really stopped.
        began = time.monotonic()
        quick = await c.delegate_task("python-computation", {"code": "'free'"}, timeout=20)
        assert quick["value"] == "free" and time.monotonic() - began < 10
        assert c.get_stats()["tasks_canceled"] == 1

        with pytest.raises(NoCapablePeerError) as err:
            await c.delegate_task("git-operation", {"op": "log"})
        assert err.value.reason == "no-capable-peer"
        message = str(err.value)
        assert (
            "git-vfs" in message
            and worker.peer_id[:16] in message
            and "python-execution" in message
        )
    finally:
        await c.leave()
        await stop_workers([worker])


async def test_a_quick_task_answers_in_one_message_and_a_slow_one_says_it_is_working(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(server.url, "r9", str(tmp_path / "w0"), *PY_CAPS, name="w0")
    c = await join("r9", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 1)
        working: list[dict[str, Any]] = []
        c.on("task:working", working.append)
        await c.delegate_task("python-computation", {"code": "1+1"})  # warm
        received = c._core.node.endpoint.received  # messages this peer got, by type
        before = received[TASK_STATUS]
        for _ in range(20):
            assert (await c.delegate_task("python-computation", {"code": "6*7"}))["value"] == 42
        # The results were the only messages back (a task slowed past the notice delay by
        # a loaded machine may add its status; every one of them did before).
        assert received[TASK_STATUS] - before <= 2
        slow = await c.delegate_task(
            "python-computation", {"code": "import time\ntime.sleep(0.5)\n7"}, timeout=30
        )
        assert slow["value"] == 7
        assert slow["task_id"] in [w["id"] for w in working]
    finally:
        await c.leave()
        await stop_workers([worker])
