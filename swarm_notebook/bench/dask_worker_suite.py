"""What fronting a Dask cluster costs: ``map`` through the swarm vs ``client.map`` directly.

One ``swarm-notebook worker --dask local:2`` process (a LocalCluster of two worker
processes, one thread each) and a notebook-side peer on one signaling server; a plain
``distributed.Client`` connects to the same scheduler. Each round maps ``plus_one`` over
2,000 items both ways, alternating which goes first, so both see the cluster in the same
state. ``dask_worker_map_s / dask_direct_map_s`` is the swarm's overhead (target <= 1.5x).
Each tool uses its default chunking: the swarm sends one message per chunk and splits
each chunk over the cluster's threads, ``client.map`` makes one Dask task per item.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from swarm_notebook.bench.baselines import plus_one
from swarm_notebook.bench.framework import Suite, SuiteContext
from swarm_notebook.bench.swarm_suites import _await_capable, _signaling
from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DaskWorkerBenchConfig:
    items: int = 2000
    rounds: int = 5

    @classmethod
    def quick(cls) -> DaskWorkerBenchConfig:
        return cls(rounds=3)


@asynccontextmanager
async def _dask_worker(url: str, room: str, home: str, allow: str) -> AsyncIterator[str]:
    """A ``--dask local:2`` worker; yields its scheduler's address."""
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "worker",
        "--signaling", url, "--room", room, "--profile", os.path.join(home, "dask-worker"),
        "--dask", "local:2", "--allow", allow, "--name", "bench-dask-worker",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
        if not line.startswith("READY"):
            raise BenchError(Reason.BENCH_FAILED, f"dask worker did not start: {line!r}")
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        yield fields["dask"]
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _timed(run_map: Callable[[int], list[Any]], n: int) -> float:
    started = time.perf_counter()
    results = run_map(n)
    elapsed = time.perf_counter() - started
    if list(results) != [x + 1 for x in range(n)]:
        raise BenchError(Reason.BENCH_FAILED, "wrong map results")
    return elapsed


async def measure_dask_worker(ctx: SuiteContext, cfg: DaskWorkerBenchConfig) -> None:
    from distributed import Client

    from swarm_notebook.client import join
    from swarm_notebook.identity import Identity

    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        notebook = os.path.join(home, "notebook")
        me = Identity.load_or_create(notebook).peer_id
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(_signaling())
            with ctx.task("start the --dask local:2 worker", None):
                address = await stack.enter_async_context(
                    _dask_worker(server.url, "daskbench", home, me)
                )
                c = await join("daskbench", signaling=server.url, profile=notebook)
                stack.push_async_callback(c.leave)
                await _await_capable(c, 1)
            direct = await asyncio.to_thread(Client, address, timeout=START_TIMEOUT_S)
            stack.callback(direct.close)
            ways: dict[str, Callable[[int], list[Any]]] = {
                "dask_worker_map_s": lambda n: c.gather(c.map(plus_one, range(n))),
                "dask_direct_map_s": lambda n: direct.gather(
                    direct.map(plus_one, range(n), pure=False)
                ),
            }
            for run_map in ways.values():
                await asyncio.to_thread(_timed, run_map, 50)  # warm up
            samples: dict[str, list[float]] = {name: [] for name in ways}
            order = list(ways)
            with ctx.task(f"map of {cfg.items}, alternating", cfg.rounds * 2) as bar:
                for _ in range(cfg.rounds):
                    for name in order:
                        samples[name].append(
                            await asyncio.to_thread(_timed, ways[name], cfg.items)
                        )
                        bar.advance()
                    order.reverse()
            for name, values in samples.items():
                ctx.record(name, values, "s")


def dask_worker_suite(config: DaskWorkerBenchConfig | None = None) -> Suite:
    """``dask-worker``: 2,000 ``map`` items through a Dask-backed swarm worker vs direct."""

    async def run(ctx: SuiteContext) -> None:
        cfg = config or (DaskWorkerBenchConfig.quick() if ctx.quick else DaskWorkerBenchConfig())
        await measure_dask_worker(ctx, cfg)

    return Suite(
        "dask-worker",
        run,
        timeout_s=300,
        quick_timeout_s=120,
        description="map through a --dask local:2 swarm worker vs client.map on its cluster",
    )
