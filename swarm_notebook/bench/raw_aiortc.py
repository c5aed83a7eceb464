"""The raw aiortc suite: the transport's ceiling, two bare peers in two child processes.

The parent starts both peers (:mod:`swarm_notebook.bench.raw_peer`), relays their SDP
over stdin/stdout pipes, shows their progress and records the metrics the offerer
reports: ``raw_connect_ms``, ``raw_rtt_ms``, ``raw_bulk_MBps`` and ``df50_raw_s``.

Example::

    report = run_suites([raw_suite(RawConfig.tiny())], quick=True, progress=NullProgress())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from typing import Any

from swarm_notebook.bench.framework import ProgressTask, Suite, SuiteContext
from swarm_notebook.bench.raw_peer import MAX_LINE_BYTES, RawConfig
from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.select import backend_name

__all__ = ["RawConfig", "measure_raw", "raw_suite"]

STDERR_TAIL_LINES = 20
EXIT_GRACE_S = 10.0


class _Child:
    """One peer process: JSON lines in and out, a bounded tail of its stderr kept."""

    def __init__(self, role: str, process: asyncio.subprocess.Process) -> None:
        self.role = role
        self.process = process
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._drain = asyncio.create_task(self._drain_stderr(), name=f"raw-{role}-stderr")

    @classmethod
    async def spawn(cls, role: str, config: RawConfig) -> _Child:
        # aiortc keeps its own bare peer; other backends run the backend-generic one.
        module = "raw_peer" if backend_name() == "aiortc" else "raw_backend_peer"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"swarm_notebook.bench.{module}",
            role,
            config.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_LINE_BYTES,
        )
        return cls(role, process)

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr_tail.append(line.decode(errors="replace").rstrip()[:300])

    def failure(self, reason: str) -> BenchError:
        tail = " | ".join(self.stderr_tail)
        return BenchError(
            Reason.BENCH_FAILED,
            f"{self.role} peer: {reason}" + (f" (stderr: {tail})" if tail else ""),
        )

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise self.failure(f"silent for {timeout:g} s") from None
        if not line:
            await asyncio.wait_for(self.process.wait(), EXIT_GRACE_S)
            await self._drain
            raise self.failure(f"exited with code {self.process.returncode}")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise self.failure(f"non-JSON output {line[:80]!r}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise self.failure(f"malformed output {line[:80]!r}")
        if message["type"] == "error":
            raise self.failure(str(message.get("message", "unknown error")))
        return message

    async def write(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        """End the child: EOF on stdin first, a kill if it does not leave in time."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            with contextlib.suppress(ConnectionError):
                self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), EXIT_GRACE_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        try:
            await asyncio.wait_for(self._drain, EXIT_GRACE_S)
        except TimeoutError:
            pass  # wait_for already cancelled the drain task


class _PhaseProgress:
    """One progress bar per phase the offerer reports, opened and closed in order."""

    def __init__(self, ctx: SuiteContext) -> None:
        self._ctx = ctx
        self._stack = contextlib.ExitStack()
        self._phase: str | None = None
        self._task: ProgressTask | None = None
        self._done = 0

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self._stack.close()
            self._task = self._stack.enter_context(self._ctx.task(phase, total))
            self._phase, self._done = phase, 0
        if self._task is not None and done > self._done:
            self._task.advance(done - self._done)
            self._done = done

    def close(self) -> None:
        self._stack.close()


async def measure_raw(ctx: SuiteContext, config: RawConfig) -> None:
    """Run both raw peers and record their metrics in ``ctx``; children are always reaped."""
    read_timeout = config.step_timeout_s + 30.0
    children: list[_Child] = []
    phases = _PhaseProgress(ctx)
    try:
        answerer = await _Child.spawn("answer", config)
        children.append(answerer)
        offerer = await _Child.spawn("offer", config)
        children.append(offerer)
        while True:
            message = await offerer.read(read_timeout)
            kind = message["type"]
            if kind == "offer":
                await answerer.write(message)
                answer = await answerer.read(read_timeout)
                if answer["type"] != "answer":
                    raise answerer.failure(f"expected an answer, got {answer['type']!r}")
                await offerer.write(answer)
            elif kind == "close":
                await answerer.write(message)
            elif kind == "progress":
                phases.update(str(message["phase"]), int(message["done"]), int(message["total"]))
            elif kind == "metric":
                ctx.record(
                    str(message["name"]),
                    [float(s) for s in message["samples"]],
                    str(message["unit"]),
                )
            elif kind == "done":
                await answerer.write({"type": "quit"})
                break
            else:
                raise offerer.failure(f"unknown message type {kind[:20]!r}")
    finally:
        phases.close()
        for child in reversed(children):
            await child.stop()


def raw_suite(config: RawConfig | None = None) -> Suite:
    """The ``raw`` suite; without a config it picks ``RawConfig.quick()``/``full()``."""

    async def run(ctx: SuiteContext) -> None:
        chosen = config or (RawConfig.quick() if ctx.quick else RawConfig.full())
        await measure_raw(ctx, chosen)

    return Suite(
        "raw",
        run,
        timeout_s=300.0,
        quick_timeout_s=90.0,
        description="two bare peers of the transport backend in two processes",
    )
