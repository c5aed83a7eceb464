"""Baselines a data scientist would otherwise pick: ipyparallel and Dask distributed.

Both run the swarm's trivial workload, evaluating the expression ``1+1``, on two local
worker processes that the suite starts and stops itself:

* ``ipyparallel_rtt_ms`` / ``dask_rtt_ms``: one synchronous call per sample.
* ``ipyparallel_tasks_per_s`` / ``dask_tasks_per_s``: N calls pipelined, then wait for all.

The framework checks that every process a suite started is gone when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from swarm_notebook.bench.framework import Suite, SuiteContext

WORKLOAD = "1+1"
WORKLOAD_RESULT = 2


def plus_one(x: int) -> int:
    """The ``map`` workload, the same function every tool maps (each at its default chunking)."""
    return x + 1


def map_rates(
    ctx: SuiteContext, label: str, run_map: Callable[[int], list[Any]], n: int, samples: int
) -> list[float]:
    """Items per second for ``run_map(n)``: ``plus_one`` over ``range(n)``, results checked."""
    run_map(min(50, n))  # warm up
    out: list[float] = []
    with ctx.task(label, samples) as task:
        for _ in range(samples):
            started = time.perf_counter()
            results = run_map(n)
            out.append(n / (time.perf_counter() - started))
            if list(results) != [x + 1 for x in range(n)]:
                raise RuntimeError(f"{label}: wrong map results")
            task.advance()
    return out


@dataclass(frozen=True)
class BaselineConfig:
    """Sample counts for a baseline; ``quick()``/``full()`` are the presets."""

    rtt_warmup: int = 50
    rtt_samples: int = 1000
    tasks_per_sample: int = 2000
    task_samples: int = 5
    start_timeout_s: float = 90.0
    call_timeout_s: float = 60.0

    @classmethod
    def full(cls) -> BaselineConfig:
        return cls()

    @classmethod
    def quick(cls) -> BaselineConfig:
        return cls(rtt_warmup=20, rtt_samples=200, tasks_per_sample=300, task_samples=3)


@contextlib.contextmanager
def _quiet_logger(logger: logging.Logger) -> Iterator[None]:
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def timed_calls_ms(
    ctx: SuiteContext, label: str, call: Callable[[], Any], warmup: int, samples: int
) -> list[float]:
    """Milliseconds per synchronous ``call()``, after ``warmup`` unmeasured calls."""
    for _ in range(warmup):
        _check(call())
    out: list[float] = []
    with ctx.task(label, samples) as task:
        for _ in range(samples):
            started = time.perf_counter()
            result = call()
            out.append((time.perf_counter() - started) * 1000.0)
            _check(result)
            task.advance()
    return out


def pipelined_rates(
    ctx: SuiteContext, label: str, batch: Callable[[int], list[Any]], n: int, samples: int
) -> list[float]:
    """Tasks per second for ``batch(n)`` (submit n, wait for all), once per sample."""
    out: list[float] = []
    with ctx.task(label, samples) as task:
        for _ in range(samples):
            started = time.perf_counter()
            results = batch(n)
            out.append(n / (time.perf_counter() - started))
            if len(results) != n:
                raise RuntimeError(f"{label}: {len(results)} results for {n} tasks")
            for result in results:
                _check(result)
            task.advance()
    return out


def _check(result: Any) -> None:
    if result != WORKLOAD_RESULT:
        raise RuntimeError(f"workload {WORKLOAD!r} returned {result!r}")


# ------------------------------------------------------------------------- ipyparallel


def _ipyparallel_measure(
    ctx: SuiteContext, config: BaselineConfig, client_info: Any, cluster: Any
) -> None:
    import ipyparallel as ipp

    # The client lives and dies on this one worker thread (its zmq sockets are not shared).
    client = ipp.Client(client_info, profile_dir=cluster.profile_dir, cluster_id=cluster.cluster_id)
    try:
        client.wait_for_engines(2, timeout=config.start_timeout_s, interactive=False)
        view = client.load_balanced_view()
        timeout = config.call_timeout_s

        def one() -> Any:
            return view.apply_async(eval, WORKLOAD).get(timeout=timeout)

        def batch(n: int) -> list[Any]:
            pending = [view.apply_async(eval, WORKLOAD) for _ in range(n)]
            return [ar.get(timeout=timeout) for ar in pending]

        ctx.record(
            "ipyparallel_rtt_ms",
            timed_calls_ms(ctx, "rtt", one, config.rtt_warmup, config.rtt_samples),
            "ms",
        )
        batch(min(50, config.tasks_per_sample))  # warm the pipeline
        ctx.record(
            "ipyparallel_tasks_per_s",
            pipelined_rates(
                ctx,
                f"{config.tasks_per_sample} tasks",
                batch,
                config.tasks_per_sample,
                config.task_samples,
            ),
            "tasks/s",
        )
        ctx.record(
            "ipyparallel_map_items_per_s",
            map_rates(
                ctx,
                f"map of {config.tasks_per_sample}",
                lambda n: list(view.map_sync(plus_one, range(n))),
                config.tasks_per_sample,
                config.task_samples,
            ),
            "items/s",
        )
    finally:
        client.close()


async def measure_ipyparallel(ctx: SuiteContext, config: BaselineConfig) -> None:
    """Start ``ipyparallel.Cluster(n=2)``, measure, stop it (engines and controller)."""
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=2, log_level=logging.ERROR, shutdown_atexit=False)
    try:
        with ctx.task("start controller + 2 engines", None):
            await asyncio.wait_for(cluster.start_cluster(), config.start_timeout_s)
            info = cluster.controller.get_connection_info()
            if asyncio.iscoroutine(info):
                info = await info
        await asyncio.to_thread(_ipyparallel_measure, ctx, config, info["client"], cluster)
    finally:
        await asyncio.wait_for(cluster.stop_cluster(), config.start_timeout_s)


# ------------------------------------------------------------------------------- Dask


def measure_dask(ctx: SuiteContext, config: BaselineConfig) -> None:
    """``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, then measure."""
    import dask
    from distributed import Client, LocalCluster, wait

    timeout = config.call_timeout_s
    with contextlib.ExitStack() as stack:
        for name in ("distributed", "dask", "tornado"):
            stack.enter_context(_quiet_logger(logging.getLogger(name)))
        stack.enter_context(dask.config.set({"distributed.admin.tick.limit": "60s"}))
        with ctx.task("start scheduler + 2 workers", None):
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    timeout=config.start_timeout_s,
                )
            )
            client = stack.enter_context(Client(cluster, timeout=config.start_timeout_s))
            client.wait_for_workers(2, timeout=config.start_timeout_s)

        def one() -> Any:
            return client.submit(eval, WORKLOAD, pure=False).result(timeout=timeout)

        def batch(n: int) -> list[Any]:
            futures = [client.submit(eval, WORKLOAD, pure=False) for _ in range(n)]
            wait(futures, timeout=timeout)
            results: list[Any] = client.gather(futures)
            return results

        ctx.record(
            "dask_rtt_ms",
            timed_calls_ms(ctx, "rtt", one, config.rtt_warmup, config.rtt_samples),
            "ms",
        )
        batch(min(50, config.tasks_per_sample))
        ctx.record(
            "dask_tasks_per_s",
            pipelined_rates(
                ctx,
                f"{config.tasks_per_sample} tasks",
                batch,
                config.tasks_per_sample,
                config.task_samples,
            ),
            "tasks/s",
        )
        ctx.record(
            "dask_map_items_per_s",
            map_rates(
                ctx,
                f"map of {config.tasks_per_sample}",
                lambda n: client.gather(client.map(plus_one, range(n), pure=False)),
                config.tasks_per_sample,
                config.task_samples,
            ),
            "items/s",
        )


def ipyparallel_suite(config: BaselineConfig | None = None) -> Suite:
    """The ``ipyparallel`` suite (2 engines, load-balanced view)."""

    async def run(ctx: SuiteContext) -> None:
        await measure_ipyparallel(
            ctx, config or (BaselineConfig.quick() if ctx.quick else BaselineConfig.full())
        )

    return Suite(
        "ipyparallel",
        run,
        timeout_s=400.0,
        quick_timeout_s=100.0,
        description="ipyparallel 2 engines, load-balanced view",
    )


def dask_suite(config: BaselineConfig | None = None) -> Suite:
    """The ``dask`` suite (LocalCluster, 2 worker processes)."""

    def run(ctx: SuiteContext) -> None:
        measure_dask(
            ctx, config or (BaselineConfig.quick() if ctx.quick else BaselineConfig.full())
        )

    return Suite(
        "dask",
        run,
        timeout_s=400.0,
        quick_timeout_s=100.0,
        description="Dask LocalCluster, 2 worker processes",
    )
