"""Resident data, per tool: one frame put on the remote worker once, then 20 small tasks on it.

The swarm ``put`` s it and ``submit`` s ``column_total(ref, column)``; Dask ``scatter`` s it
and ``submit`` s the function on the future (``pure=False``, or Dask would run it once);
ipyparallel ``push`` es it into the engine's namespace and ``apply`` s the function to
``Reference("df")``. Each sample is one batch: all 20 tasks submitted at once, then every
result waited for (gathered) and checked against the sum computed here. The put is timed
on its own: it happens once, before the batches, and no batch includes it.

Run through ``data_driver`` (``FRAME`` = ``resident20``), in its own process.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd

from swarm_notebook.bench.data_driver import (
    TIMEOUT_S,
    ipyparallel_engine,
    link_bytes,
    swarm_client,
    swarm_compression,
)

TASKS = 20
COLUMNS = "abcd"  # df50's columns; task i sums column i % 4


def column_total(df: pd.DataFrame, column: str) -> float:
    """The task: small work and a small answer, so the data's residence is what is timed."""
    return float(df[column].sum())


def _columns(i: int) -> str:
    return COLUMNS[i % len(COLUMNS)]


def _check(frame: pd.DataFrame, results: list[Any]) -> None:
    if len(results) != TASKS:
        raise RuntimeError(f"{len(results)} results for {TASKS} tasks")
    for i, got in enumerate(results):
        want = float(frame[_columns(i)].sum())
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-9):
            raise RuntimeError(f"task {i}: sum of {_columns(i)!r} came back {got!r}, not {want}")


async def run_swarm(frame: pd.DataFrame, rounds: int, url: str) -> dict[str, Any]:
    async with swarm_client(url) as c:
        warm = await c.put(frame.iloc[:1000])
        await c.submit(column_total, warm, "a", timeout=TIMEOUT_S)  # ships the function
        await c.release(warm)
        start = time.perf_counter()
        ref = await c.put(frame)
        out: dict[str, Any] = {"put": [time.perf_counter() - start], "samples": []}
        for _ in range(rounds):
            sent_before, _ = link_bytes(c)
            start = time.perf_counter()
            futures = [
                c.submit(column_total, ref, _columns(i), timeout=TIMEOUT_S) for i in range(TASKS)
            ]
            results = [await f for f in futures]
            out["samples"].append(time.perf_counter() - start)
            _check(frame, results)
            # Resident means the frame did not travel again: 20 task messages are a few KB.
            sent = link_bytes(c)[0] - sent_before
            if sent > ref.size / 10:
                raise RuntimeError(f"a batch on the ref sent {sent} bytes (frame: {ref.size})")
            if {f.peer for f in futures} != set(ref.holders):
                raise RuntimeError("a task on the ref ran away from its holder")
        await c.release(ref)
        out["note"] = f"{TASKS} tasks gathered per sample; put timed once, apart; " + (
            swarm_compression(c)
        )
        return out


def run_dask(frame: pd.DataFrame, rounds: int, address: str) -> dict[str, Any]:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        warm = client.scatter(frame.iloc[:1000])
        client.submit(column_total, warm, "a", pure=False).result(timeout=TIMEOUT_S)
        del warm
        start = time.perf_counter()
        future = client.scatter(frame)
        out: dict[str, Any] = {"put": [time.perf_counter() - start], "samples": []}
        for _ in range(rounds):
            start = time.perf_counter()
            futures = [
                client.submit(column_total, future, _columns(i), pure=False) for i in range(TASKS)
            ]
            results = client.gather(futures)
            out["samples"].append(time.perf_counter() - start)
            _check(frame, results)
            del futures
    out["note"] = f"{TASKS} tasks gathered per sample; scatter timed once, apart"
    return out


def run_ipyparallel(frame: pd.DataFrame, rounds: int) -> dict[str, Any]:
    import ipyparallel as ipp

    with ipyparallel_engine() as (view, _):
        view.push({"df": frame.iloc[:1000]}, block=True)
        view.apply_sync(column_total, ipp.Reference("df"), "a")
        start = time.perf_counter()
        view.push({"df": frame}, block=True)
        out: dict[str, Any] = {"put": [time.perf_counter() - start], "samples": []}
        for _ in range(rounds):
            start = time.perf_counter()
            pending = [
                view.apply_async(column_total, ipp.Reference("df"), _columns(i))
                for i in range(TASKS)
            ]
            results = [r.get(timeout=TIMEOUT_S) for r in pending]
            out["samples"].append(time.perf_counter() - start)
            _check(frame, results)
    out["note"] = f"{TASKS} tasks gathered per sample; push timed once, apart"
    return out


def run(tool: str, frame: pd.DataFrame, rounds: int, address: str) -> dict[str, Any]:
    """One tool's resident20 reply: ``put`` (seconds, once) and ``samples`` (per batch)."""
    import asyncio

    if tool == "swarm":
        return asyncio.run(run_swarm(frame, rounds, address))
    if tool == "dask":
        return run_dask(frame, rounds, address)
    if tool == "ipyparallel":
        return run_ipyparallel(frame, rounds)
    raise ValueError(f"unknown tool {tool!r}")
