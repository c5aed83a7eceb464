"""What the sandbox costs: the same delegations to bubblewrap workers and to unisolated ones.

Two rooms on one signaling server, two worker processes each, the same warm pool on both
sides; the only difference is ``--unsafe-no-isolation``. Rounds alternate between the
rooms (and which goes first) so both see the machine in the same state, and the ratio
``sandboxed / unsandboxed`` is the sandbox's price.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import AsyncExitStack
from typing import Any

from swarm_notebook.bench.framework import Suite, SuiteContext
from swarm_notebook.bench.swarm_suites import (
    SwarmBenchConfig,
    _await_capable,
    _signaling,
    _workers,
    delegate_pipelined,
    delegate_round_trips,
)

RTT_BLOCK = 25
# A pipelined round must last long enough to average out the scheduler: rounds of 300
# tasks (0.2-0.4 s) read anywhere from 0.67x to 1.21x across quick runs of the same commit,
# while full runs (2,000 tasks) read 0.96-1.08x. So even the quick run uses long rounds.
MIN_ROUND_TASKS = 1000
MIN_ROUNDS_PER_SIDE = 3


async def measure_isolation(ctx: SuiteContext, cfg: SwarmBenchConfig) -> None:
    from swarm_notebook.client import join

    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(_signaling())
            sides: dict[str, Any] = {}
            for name, isolated in (("sandboxed", True), ("unsandboxed", False)):
                await stack.enter_async_context(
                    _workers(server.url, name, home, 2, isolated=isolated)
                )
                c = await join(name, signaling=server.url, profile=os.path.join(home, name))
                stack.push_async_callback(c.leave)
                sides[name] = c
            for c in sides.values():
                await _await_capable(c, 2)
                await delegate_round_trips(c, 50)
            order = list(sides)
            rtt: dict[str, list[float]] = {name: [] for name in sides}
            with ctx.task("round trips, alternating", cfg.delegate_rtt_samples * 2) as bar:
                for block in range(0, cfg.delegate_rtt_samples, RTT_BLOCK):
                    n = min(RTT_BLOCK, cfg.delegate_rtt_samples - block)
                    for name in order:
                        rtt[name] += await delegate_round_trips(sides[name], n)
                        bar.advance(n)
                    order.reverse()
            rates: dict[str, list[float]] = {name: [] for name in sides}
            rounds = max(cfg.pipelined_rounds * 2, MIN_ROUNDS_PER_SIDE)
            tasks = max(cfg.pipelined_tasks, MIN_ROUND_TASKS)
            with ctx.task("pipelined, alternating", rounds * 2) as bar:
                for _ in range(rounds):
                    for name in order:
                        rates[name].append(
                            await delegate_pipelined(sides[name], tasks)
                        )
                        bar.advance()
                    order.reverse()
            for name in sides:
                ctx.record(f"{name}_rtt_ms", rtt[name], "ms")
                ctx.record(f"{name}_tasks_per_s", rates[name], "tasks/s")


def isolation_suite(config: SwarmBenchConfig | None = None) -> Suite:
    """``isolation``: sandboxed vs ``--unsafe-no-isolation`` workers, alternating rounds."""

    async def isolation(ctx: SuiteContext) -> None:
        cfg = config or (SwarmBenchConfig.quick() if ctx.quick else SwarmBenchConfig.full())
        await measure_isolation(ctx, cfg)

    return Suite(
        "isolation",
        isolation,
        timeout_s=600,
        quick_timeout_s=180,
        description="delegation to bubblewrap workers vs unisolated ones, rounds alternating",
    )
