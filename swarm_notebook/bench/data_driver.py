"""The local end of one data-movement measurement, in its own process (and namespace).

``python -m swarm_notebook.bench.data_driver TOOL FRAME ROWS ROUNDS ADDRESS [WORKER_PID]``
pushes the frame to a remote worker and pulls it back ``ROUNDS`` times, checks that it
came back equal, and prints one JSON line: seconds per round, peak RSS above baseline on
this end and (given the worker's pid, whose process tree it samples) on the worker's,
the bytes this end put on and took off the link, and the tool's compression setting.

TOOL is ``swarm`` (``delegate_task`` with the frame as input and value; ADDRESS is the
signaling URL), ``dask`` (scatter, submit identity, gather; ADDRESS the scheduler) or
``ipyparallel`` (push, pull; it starts its own controller and one engine here).
FRAME ``resident20`` instead puts a df50 frame once and times 20 tasks on it
(``data_resident``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pandas as pd

from swarm_notebook.bench.data_frames import FRAMES, PeakRss, frame_bytes

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

TIMEOUT_S = 300.0
RESIDENT20 = "resident20"


def _check(sent: pd.DataFrame, back: Any) -> None:
    if not isinstance(back, pd.DataFrame) or not back.equals(sent):
        raise RuntimeError(f"the frame came back different: {type(back).__name__}")


def _pids(worker_pid: int | None) -> list[int]:
    return [worker_pid] if worker_pid else []


@contextlib.asynccontextmanager
async def swarm_client(url: str) -> AsyncIterator[Coordinator]:
    """A notebook-side peer in room ``data`` once a python-execution worker is connected."""
    from swarm_notebook.client import join

    with tempfile.TemporaryDirectory(prefix="swarm-data-") as home:
        c = await join("data", signaling=url, profile=os.path.join(home, "delegator"))
        try:
            deadline = time.monotonic() + 60
            while not any(
                "python-execution" in p["capabilities"] and p["state"] == "connected"
                for p in c.get_stats()["peers"]
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("no worker became available")
                await asyncio.sleep(0.05)
            yield c
        finally:
            await c.leave()


def link_bytes(c: Coordinator) -> tuple[int, int]:
    """Bytes this peer's transport has sent and received so far (all links)."""
    stats = c._core.node.transport.stats()
    return int(stats["bytes_out"]), int(stats["bytes_in"])  # type: ignore[call-overload]


def swarm_compression(c: Coordinator) -> str:
    codec = c._core.config.compression
    return f"compression: {codec or 'off'} when a sample shrinks >= 10% (adaptive)"


@contextlib.contextmanager
def ipyparallel_engine() -> Iterator[tuple[Any, int]]:
    """A controller and one engine started here: (a direct view on it, the engine's pid)."""
    import logging

    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=logging.ERROR, shutdown_atexit=False)
    client = cluster.start_and_connect_sync()
    try:
        client.wait_for_engines(1, timeout=90, interactive=False)
        view = client[0]
        yield view, int(view.apply_sync(os.getpid))
    finally:
        client.close()
        cluster.stop_cluster_sync()


async def run_swarm(
    frame: pd.DataFrame, rounds: int, url: str, worker_pid: int | None
) -> dict[str, Any]:
    async with swarm_client(url) as c:
        warm = frame.iloc[:1000]
        _check(
            warm,
            (
                await c.delegate_task(
                    "python-computation",
                    {"code": "df", "inputs": {"df": warm}},
                    timeout=TIMEOUT_S,
                )
            )["value"],
        )
        out: dict[str, Any] = {"samples": [], "link": [], "rss_local": [], "rss_remote": []}
        for round_ in range(rounds):
            before = link_bytes(c)
            local, remote = PeakRss([os.getpid()]), PeakRss(_pids(worker_pid))
            with local, remote:
                start = time.perf_counter()
                result = await c.delegate_task(
                    "python-computation",
                    {"code": "df", "inputs": {"df": frame}},
                    timeout=TIMEOUT_S,
                )
                out["samples"].append(time.perf_counter() - start)
            if not result.get("success"):
                raise RuntimeError(f"task failed: {result.get('error')}")
            _check(frame, result["value"])
            del result
            out["link"].append(sum(link_bytes(c)) - sum(before))
            if round_ == 0:
                # Later rounds reuse memory the first one reserved: only the first
                # says what a push + pull needs above the process's baseline.
                out["rss_local"].append(local.above_baseline)
                out["rss_remote"].append(remote.above_baseline)
        out["note"] = swarm_compression(c)
        return out


def run_dask(
    frame: pd.DataFrame, rounds: int, address: str, worker_pid: int | None
) -> dict[str, Any]:
    import dask
    from distributed import Client

    setting = dask.config.get("distributed.comm.compression")
    out: dict[str, Any] = {"samples": [], "rss_local": [], "rss_remote": [], "link": []}
    with Client(address, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        warm = frame.iloc[:1000]
        _check(warm, client.submit(lambda x: x, client.scatter(warm), pure=False).result())
        for _ in range(rounds):
            local, remote = PeakRss([os.getpid()]), PeakRss(_pids(worker_pid))
            with local, remote:
                start = time.perf_counter()
                future = client.scatter(frame)
                back = client.submit(lambda x: x, future, pure=False).result(timeout=TIMEOUT_S)
                out["samples"].append(time.perf_counter() - start)
            _check(frame, back)
            del back, future
            if not out["rss_local"]:  # the first round only, as for the swarm
                out["rss_local"].append(local.above_baseline)
                out["rss_remote"].append(remote.above_baseline)
    out["note"] = f"distributed.comm.compression = {setting!r} (the default)"
    return out


def run_ipyparallel(frame: pd.DataFrame, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": [], "rss_local": [], "rss_remote": [], "link": []}
    with ipyparallel_engine() as (view, engine_pid):
        view.push({"df": frame.iloc[:1000]}, block=True)
        for _ in range(rounds):
            local, remote = PeakRss([os.getpid()]), PeakRss([engine_pid])
            with local, remote:
                start = time.perf_counter()
                view.push({"df": frame}, block=True)
                back = view.pull("df", block=True)
                out["samples"].append(time.perf_counter() - start)
            _check(frame, back)
            del back
            view.execute("del df", block=True)
            if not out["rss_local"]:  # the first round only, as for the swarm
                out["rss_local"].append(local.above_baseline)
                out["rss_remote"].append(remote.above_baseline)
    out["note"] = "no compression (ipyparallel has no such setting; pickle-5 buffers over zmq)"
    return out


def main(argv: list[str]) -> int:
    tool, kind, rows, rounds, address = argv[:5]
    worker_pid = int(argv[5]) if len(argv) > 5 else None
    # resident20 moves a df50 frame once and then runs tasks where it stays.
    frame = FRAMES["df50" if kind == RESIDENT20 else kind](int(rows))
    try:
        if kind == RESIDENT20:
            from swarm_notebook.bench import data_resident

            out = data_resident.run(tool, frame, int(rounds), address)
        elif tool == "swarm":
            out = asyncio.run(run_swarm(frame, int(rounds), address, worker_pid))
        elif tool == "dask":
            out = run_dask(frame, int(rounds), address, worker_pid)
        elif tool == "ipyparallel":
            out = run_ipyparallel(frame, int(rounds))
        else:
            raise ValueError(f"unknown tool {tool!r}")
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
        return 1
    out["frame_bytes"] = frame_bytes(frame)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
