"""Drive peer processes from tests: JSON lines on stdin (commands) and stdout (events)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PeerProcess:
    """A child process speaking the JSON-lines protocol of ``tests/support/*_peer.py``."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._changed = asyncio.Condition()
        self._ids = 0
        self._reader = asyncio.create_task(self._read_stdout())
        self._err_reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(
        cls,
        script: str,
        *args: str,
        name: str = "peer",
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> PeerProcess:
        """Run ``tests/support/<script>`` with ``python`` (default: this interpreter)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable,
            os.path.join(REPO, "tests", "support", script),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            limit=64 * 1024 * 1024,
        )
        return cls(proc, name)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": line.decode(errors="replace")}
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        async with self._changed:
            self.events.append({"event": "exited"})
            self._changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_lines.append(line.decode(errors="replace"))

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            async with self._changed:
                while True:
                    for event in self.events[start:]:
                        if predicate(event):
                            return event
                    if self.events and self.events[-1].get("event") == "exited":
                        raise RuntimeError(
                            f"{self.name} exited:\n{''.join(self.stderr_lines[-40:])}"
                        )
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: no matching event in {timeout} s; events: {self.events[-10:]}\n"
                f"stderr: {''.join(self.stderr_lines[-30:])}"
            ) from None

    async def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        self._ids += 1
        call_id = self._ids
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, "call": call_id, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await self.wait_for(lambda e: e.get("reply_to") == call_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{self.name} {cmd} failed: {reply['error']}")
        return reply

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 20.0) -> int:
        """Ask the process to quit cleanly; returns its exit code."""
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd": "quit", "call": 0}\n')
                await self.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        await asyncio.gather(self._reader, self._err_reader, return_exceptions=True)
        return self.proc.returncode if self.proc.returncode is not None else -1

    def problems(self) -> list[str]:
        """Lines in stderr that must never appear in a clean run."""
        bad = ("Task was destroyed", "Traceback", "never awaited", "Unclosed", "unclosed")
        return [line for line in self.stderr_lines if any(b in line for b in bad)]


def child_processes() -> list[psutil.Process]:
    """Live descendants of this process, but for multiprocessing's resource tracker.

    The tracker is the standard library's: the first ``multiprocessing`` use that needs it
    (a Dask ``LocalCluster`` of processes in test_dask_parts) starts it, and it serves the
    interpreter until exit, so every later test would count it as a leak of its own.
    """
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not _resource_tracker(p)
    ]


def _resource_tracker(proc: psutil.Process) -> bool:
    try:
        return any("multiprocessing.resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


class WorkerProcess:
    """``swarm-notebook worker`` as a real child process."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.peer_id = ""
        self.fields: dict[str, str] = {}  # of its READY line
        self.capabilities: list[str] = []
        self.output: list[str] = []
        self.stderr_lines: list[str] = []
        self._err_reader: asyncio.Task[None] | None = None
        self._out_reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        signaling: str,
        room: str | None,
        profile: str,
        *args: str,
        name: str = "worker",
        timeout: float = 60,
    ) -> WorkerProcess:
        """Start a worker in ``room`` (``None``: the worker's own default room)."""
        rooms = ["--room", room] if room is not None else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "swarm_notebook.cli.main",
            "worker",
            "--signaling",
            signaling,
            *rooms,
            "--profile",
            profile,
            "--name",
            name,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        worker = cls(proc, name)
        worker._err_reader = asyncio.create_task(worker._read_stderr())
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            worker.kill()
            raise
        text = line.decode()
        if not text.startswith("READY"):
            await proc.wait()
            raise RuntimeError(f"{name} did not start: {text}{''.join(worker.stderr_lines)}")
        fields = dict(part.split("=", 1) for part in text.split()[1:])
        worker.fields = fields
        worker.peer_id = fields["peer_id"]
        worker.capabilities = [c for c in fields["capabilities"].split(",") if c != "-"]
        worker._out_reader = asyncio.create_task(worker._read_stdout())
        return worker

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr_lines.append(line.decode(errors="replace"))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float = 40) -> int:
        self.terminate()
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            code = await self.proc.wait()
        readers = [t for t in (self._out_reader, self._err_reader) if t is not None]
        await asyncio.gather(*readers, return_exceptions=True)
        return code

    def problems(self) -> list[str]:
        bad = ("Task was destroyed", "Traceback", "never awaited", "Unclosed")
        return [line for line in self.stderr_lines if any(b in line for b in bad)]


async def start_workers(
    signaling: str, room: str, home: Path, n: int, *args: str
) -> list[WorkerProcess]:
    """``n`` workers named w0..w{n-1}, each with its own profile folder under ``home``."""
    return list(await asyncio.gather(*(
        WorkerProcess.start(signaling, room, str(home / f"w{i}"), *args, name=f"w{i}")
        for i in range(n)
    )))  # fmt: skip
