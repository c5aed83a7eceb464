"""The swarm's own suites: full-stack messaging, delegation, a 50 MB DataFrame, a 6-peer mesh.

Each runs a real signaling server on loopback and real peers in separate processes, in
the same run as the raw aiortc and ipyparallel/Dask suites they are compared with.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from swarm_notebook.bench.framework import Suite, SuiteContext
from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingConfig, SignalingServer

STEP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class SwarmBenchConfig:
    rtt_samples: int
    bulk_bytes: int
    bulk_rounds: int
    delegate_rtt_samples: int
    pipelined_tasks: int
    pipelined_rounds: int
    df_rows: int
    df_rounds: int
    mesh_rounds: int
    cancel_rounds: int = 5

    @classmethod
    def full(cls) -> SwarmBenchConfig:
        return cls(2000, 32 * 2**20, 4, 500, 2000, 3, 3_300_000, 3, 3)

    @classmethod
    def quick(cls) -> SwarmBenchConfig:
        return cls(300, 8 * 2**20, 3, 100, 300, 2, 3_300_000, 1, 1, 3)


class _Peer:
    """``swarm_peer`` in a child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.peer_id = ""
        self.stderr: list[str] = []
        self._stderr_task = asyncio.ensure_future(self._drain())

    @classmethod
    async def spawn(cls) -> _Peer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "swarm_notebook.bench.swarm_peer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        peer = cls(process)
        await peer._read(60)  # {"event": "ready"} once imports are done
        return peer

    async def _drain(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr.append(line.decode(errors="replace"))

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise BenchError(
                Reason.BENCH_FAILED, "bench peer exited: " + "".join(self.stderr[-20:])
            )
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise BenchError(Reason.BENCH_FAILED, f"bench peer: {message['error']}")
        return message

    async def call(self, cmd: str, timeout: float = STEP_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.process.stdin.drain()
        return await self._read(timeout)

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(b'{"cmd": "quit"}\n')
                await self.process.stdin.drain()
                await asyncio.wait_for(self.process.wait(), 30)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(self._stderr_task, return_exceptions=True)


@asynccontextmanager
async def _signaling() -> AsyncIterator[SignalingServer]:
    server = SignalingServer(SignalingConfig(port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def _peers(n: int) -> AsyncIterator[list[_Peer]]:
    peers = list(await asyncio.gather(*(_Peer.spawn() for _ in range(n))))
    try:
        yield peers
    finally:
        await asyncio.gather(*(p.stop() for p in peers), return_exceptions=True)


async def _join_all(peers: list[_Peer], url: str, room: str, home: str) -> None:
    replies = await asyncio.gather(
        *(
            p.call("join", signaling=url, room=room, profile=os.path.join(home, f"{room}-{i}"))
            for i, p in enumerate(peers)
        )
    )
    for peer, reply in zip(peers, replies, strict=True):
        peer.peer_id = reply["peer_id"]
    await asyncio.gather(*(p.call("wait_peers", n=len(peers) - 1) for p in peers))


async def measure_messaging(ctx: SuiteContext, cfg: SwarmBenchConfig) -> None:
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        async with _signaling() as server, _peers(2) as (a, b):
            with ctx.task("swarm: join", None):
                await _join_all([a, b], server.url, "msg", home)
            with ctx.task("swarm: round trips", cfg.rtt_samples):
                reply = await a.call("rtt", peer=b.peer_id, n=cfg.rtt_samples)
            ctx.record("swarm_rtt_ms", reply["stack"], "ms")
            ctx.record("swarm_rtt_bridged_ms", reply["bridged"], "ms")
            with ctx.task("swarm: bulk", cfg.bulk_rounds):
                reply = await a.call(
                    "bulk", peer=b.peer_id, size=cfg.bulk_bytes, rounds=cfg.bulk_rounds
                )
            ctx.record("swarm_bulk_MBps", reply["samples"], "MB/s")


@asynccontextmanager
async def _workers(
    url: str, room: str, home: str, n: int, *, isolated: bool = True
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs = []
    # The unisolated variant exists only to measure what the sandbox costs.
    unsafe = [] if isolated else ["--unsafe-no-isolation"]
    try:
        for i in range(n):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "swarm_notebook.cli.main",
                    "worker",
                    "--signaling",
                    url,
                    "--room",
                    room,
                    "--profile",
                    os.path.join(home, f"{room}-worker{i}"),
                    "--caps",
                    "python-execution",
                    "--concurrency",
                    "2",
                    "--name",
                    f"bench-{room}-worker{i}",
                    *unsafe,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line.startswith(b"READY"):
                raise BenchError(Reason.BENCH_FAILED, f"worker did not start: {line!r}")
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _await_capable(c: Any, n: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        peers = c.get_stats()["peers"]
        if (
            sum(
                1
                for p in peers
                if "python-execution" in p["capabilities"] and p["state"] == "connected"
            )
            >= n
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(Reason.BENCH_FAILED, f"workers did not become available: {peers}")
        await asyncio.sleep(0.05)


DELEGATED = {"code": "1+1"}


async def delegate_round_trips(c: Any, n: int, bar: Any = None) -> list[float]:
    """``n`` delegations of ``1+1`` one after another: each round trip in ms."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        result = await c.delegate_task("python-computation", DELEGATED)
        samples.append((time.perf_counter() - start) * 1000)
        if result["value"] != 2:
            raise BenchError(Reason.BENCH_FAILED, f"wrong result {result}")
        if bar is not None:
            bar.advance()
    return samples


async def delegate_pipelined(c: Any, n: int) -> float:
    """``n`` delegations of ``1+1`` gathered at once: tasks per second."""
    start = time.perf_counter()
    results = await asyncio.gather(
        *(c.delegate_task("python-computation", DELEGATED) for _ in range(n))
    )
    rate = n / (time.perf_counter() - start)
    if any(r["value"] != 2 for r in results):
        raise BenchError(Reason.BENCH_FAILED, "a pipelined task returned a wrong result")
    return rate


async def measure_delegation(
    ctx: SuiteContext, cfg: SwarmBenchConfig, with_dataframe: bool
) -> None:
    from swarm_notebook.client import join

    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        async with _signaling() as server, _workers(server.url, "deleg", home, 2) as procs:
            c = await join("deleg", signaling=server.url, profile=os.path.join(home, "notebook"))
            try:
                await _await_capable(c, 2)
                await delegate_round_trips(c, 50)
                with ctx.task("delegate: round trips", cfg.delegate_rtt_samples) as bar:
                    samples = await delegate_round_trips(c, cfg.delegate_rtt_samples, bar)
                ctx.record("delegate_rtt_ms", samples, "ms")
                rates = []
                with ctx.task("delegate: pipelined", cfg.pipelined_rounds) as bar:
                    for _ in range(cfg.pipelined_rounds):
                        rates.append(await delegate_pipelined(c, cfg.pipelined_tasks))
                        bar.advance()
                ctx.record("delegate_tasks_per_s", rates, "tasks/s")
                await _measure_futures(ctx, cfg, c)
                await _measure_cancel(ctx, cfg, c, procs)
                if with_dataframe:
                    await _measure_dataframe(ctx, cfg, c)
            finally:
                await c.leave()


async def _measure_futures(ctx: SuiteContext, cfg: SwarmBenchConfig, c: Any) -> None:
    """``submit`` round trips and ``map`` throughput (``plus_one``, default chunking)."""
    from swarm_notebook.bench.baselines import map_rates, plus_one

    for _ in range(20):
        await c.submit(plus_one, 1)
    samples = []
    with ctx.task("submit: round trips", cfg.delegate_rtt_samples) as bar:
        for _ in range(cfg.delegate_rtt_samples):
            start = time.perf_counter()
            value = await c.submit(plus_one, 1)
            samples.append((time.perf_counter() - start) * 1000)
            if value != 2:
                raise BenchError(Reason.BENCH_FAILED, f"submit returned {value!r}")
            bar.advance()
    ctx.record("submit_rtt_ms", samples, "ms")
    rates = await asyncio.to_thread(
        map_rates,
        ctx,
        f"map of {cfg.pipelined_tasks}",
        lambda n: c.gather(c.map(plus_one, range(n))),
        cfg.pipelined_tasks,
        cfg.pipelined_rounds,
    )
    ctx.record("map_items_per_s", rates, "items/s")


def _spin() -> None:
    while True:
        pass


async def _measure_cancel(
    ctx: SuiteContext, cfg: SwarmBenchConfig, c: Any, procs: list[asyncio.subprocess.Process]
) -> None:
    """``cancel_to_gone_ms``: from ``fut.cancel()`` on a running task until its sandbox
    process no longer exists on the worker (no target; the issue asks for it reported)."""
    import psutil

    samples = []
    with ctx.task("cancel: until the process is gone", cfg.cancel_rounds) as bar:
        for _ in range(cfg.cancel_rounds):
            # The child replacing the last round's killed one burns CPU while it starts:
            # let it settle, or it could pass for the spinning task's process.
            await _descendants_quiet([p.pid for p in procs])
            fut = c.submit(_spin, retries=0, timeout=120)
            deadline = time.monotonic() + 60
            while fut.state != "working":
                if time.monotonic() > deadline:
                    raise BenchError(Reason.BENCH_FAILED, f"spin task never started: {fut.state}")
                await asyncio.sleep(0.005)
            name = str(c.peer_name(fut.peer) or "")
            # Worker names are bench-<room>-worker<i> (see _workers).
            worker = procs[int(name.rpartition("-worker")[2])]
            pid = await _busiest_descendant(worker.pid)
            start = time.perf_counter()
            fut.cancel()
            while _exists(psutil, pid):
                if time.perf_counter() - start > 10:
                    raise BenchError(Reason.BENCH_FAILED, "a cancelled task's process lived 10 s")
                await asyncio.sleep(0.001)  # the resolution of the measurement
            samples.append((time.perf_counter() - start) * 1000)
            bar.advance()
    ctx.record("cancel_to_gone_ms", samples, "ms")


def _exists(psutil: Any, pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def _descendants_quiet(roots: list[int], timeout: float = 30.0) -> None:
    """Until no descendant of ``roots`` gains CPU time (a fresh sandbox child importing)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        procs = [d for r in roots for d in psutil.Process(r).children(recursive=True)]
        before = {p.pid: _user_time(psutil, p) for p in procs}
        await asyncio.sleep(0.1)  # the sampling window, not a wait for an event
        gains = [_user_time(psutil, p) - before[p.pid] for p in procs]
        if max(gains, default=0.0) < 0.01:
            return
        if time.monotonic() > deadline:
            raise BenchError(Reason.BENCH_FAILED, "the workers' sandbox children never settled")


def _user_time(psutil: Any, proc: Any) -> float:
    try:
        return float(proc.cpu_times().user)
    except psutil.NoSuchProcess:
        return 0.0


async def _busiest_descendant(root: int) -> int:
    """The worker's descendant gaining the most CPU time: the spinning sandbox child."""
    import psutil

    procs = psutil.Process(root).children(recursive=True)
    first = {}
    for p in procs:
        try:
            first[p.pid] = p.cpu_times().user
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + 10
    while True:
        await asyncio.sleep(0.1)
        gains = {}
        for p in procs:
            try:
                gains[p.pid] = p.cpu_times().user - first.get(p.pid, 0.0)
            except psutil.NoSuchProcess:
                continue
        if gains:
            pid, gain = max(gains.items(), key=lambda kv: kv[1])
            if gain > 0.03:
                return pid
        if time.monotonic() > deadline:
            raise BenchError(Reason.BENCH_FAILED, "no busy sandbox process found")


async def _measure_dataframe(ctx: SuiteContext, cfg: SwarmBenchConfig, c: Any) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.random(cfg.df_rows), "b": np.arange(cfg.df_rows, dtype="int64")})
    samples = []
    with ctx.task("df50: push + pull", cfg.df_rounds) as bar:
        for _ in range(cfg.df_rounds):
            start = time.perf_counter()
            result = await c.delegate_task(
                "python-computation", {"code": "df", "inputs": {"df": df}}, timeout=300
            )
            samples.append(time.perf_counter() - start)
            if not result["success"] or len(result["value"]) != len(df):
                raise BenchError(
                    Reason.BENCH_FAILED, f"50 MB DataFrame did not come back: {result.get('error')}"
                )
            bar.advance()
    ctx.record("df50_swarm_s", samples, "s")


async def measure_mesh(ctx: SuiteContext, cfg: SwarmBenchConfig) -> None:
    samples = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as home:
        async with _signaling() as server:
            for round_ in range(cfg.mesh_rounds):
                async with _peers(6) as peers:
                    with ctx.task(f"mesh6: round {round_ + 1}", None):
                        start = time.perf_counter()
                        await _join_all(peers, server.url, f"mesh{round_}", home)
                        samples.append(time.perf_counter() - start)
    ctx.record("mesh6_s", samples, "s")


def swarm_suites(config: SwarmBenchConfig | None = None) -> list[Suite]:
    """``swarm`` (messaging), ``delegate`` (+ 50 MB DataFrame) and ``mesh6``."""

    def pick(ctx: SuiteContext) -> SwarmBenchConfig:
        return config or (SwarmBenchConfig.quick() if ctx.quick else SwarmBenchConfig.full())

    async def swarm(ctx: SuiteContext) -> None:
        await measure_messaging(ctx, pick(ctx))

    async def delegate(ctx: SuiteContext) -> None:
        await measure_delegation(ctx, pick(ctx), with_dataframe=True)

    async def mesh6(ctx: SuiteContext) -> None:
        await measure_mesh(ctx, pick(ctx))

    return [
        Suite(
            "swarm",
            swarm,
            timeout_s=300,
            quick_timeout_s=120,
            description="request/response and bulk through the full stack, two processes",
        ),
        Suite(
            "delegate",
            delegate,
            timeout_s=600,
            quick_timeout_s=180,
            description="delegate_task to 2 worker processes; 50 MB DataFrame push + pull",
        ),
        Suite(
            "mesh6",
            mesh6,
            timeout_s=300,
            quick_timeout_s=120,
            description="6 peer processes join one room until the mesh is full",
        ),
    ]
