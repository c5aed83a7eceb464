"""Child processes of a local swarm: a signaling server and workers, started and stopped.

``swarm-notebook up`` (``cli/up.py``) and ``swarm_notebook.local()`` both start their
workers here. ``local()`` is the notebook's zero-configuration start, like Dask's
``Client()`` with no arguments: a signaling server and N isolated workers as children of
the kernel, a room secret made for them, and a joined ``Coordinator``; leaving (or the
kernel exiting) stops them all.

>>> c = await swarm_notebook.local(workers=2)   # doctest: +SKIP
>>> await c.delegate_task("python-computation", {"code": "6 * 7"})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

import swarm_notebook.environment as environment
from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.errors import StartupError, UsageError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.mesh import MeshConfig
from swarm_notebook.workload.executors.capabilities import PYTHON_EXECUTION

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

WORKER_READY_TIMEOUT_S = 90.0
SIGNAL_READY_TIMEOUT_S = 30.0
WORKER_GRACE_S = 20.0
LOCAL_ROOM = "local"
MAX_LOCAL_WORKERS = 16
SIGNAL_READY_PREFIX = "signaling server listening on "
LOOPBACK = "127.0.0.1"


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Child:
    """A process started in its own session (so a terminal's Ctrl-C reaches only its
    launcher, which then stops its children in order)."""

    name: str
    proc: asyncio.subprocess.Process
    info: dict[str, str] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    async def stop(self, timeout: float, group: bool = False) -> int:
        """SIGTERM, wait, then SIGKILL whatever is left of its process tree."""
        tree = self.tree()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                else:
                    self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                say(f"{self.name} did not stop within {timeout:g} s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        # Children in their own sessions (e.g. kernels) are not in the process group.
        _, alive = await asyncio.to_thread(psutil.wait_procs, tree, 10)
        for survivor in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                survivor.kill()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        return self.proc.returncode if self.proc.returncode is not None else -1


async def drain(stream: asyncio.StreamReader | None) -> None:
    """Keep reading a child's stdout so it never blocks on a full pipe."""
    if stream is None:
        return
    while await stream.readline():
        pass


async def _first_line(child: Child, timeout: float, log_path: Path) -> str:
    """The child's first stdout line (its READY line), or a ``StartupError`` saying why not."""
    assert child.proc.stdout is not None
    try:
        line = await asyncio.wait_for(child.proc.stdout.readline(), timeout)
    except TimeoutError:
        await child.stop(5)
        raise StartupError(f"{child.name} did not start within {timeout:g} s") from None
    except BaseException:  # stopped while starting: do not leave it behind
        await asyncio.shield(child.stop(WORKER_GRACE_S))
        raise
    text = line.decode(errors="replace").strip()
    if not text:
        await child.stop(5)
        raise StartupError(f"{child.name} exited while starting; see {log_path}")
    return text


async def start_worker(
    index: int,
    signaling: str,
    room: str,
    secret: str,
    profile: Path,
    log_path: Path,
    env: dict[str, str],
) -> Child:
    """``swarm-notebook worker`` #``index`` offering python-execution to ``room`` only."""
    name = f"local-worker-{index}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarm_notebook.cli.main", "worker",
            # The secret travels in the environment (SWARM_NOTEBOOK_SECRET), not argv,
            # where any local user could read it with ps.
            "--room", room, "--signaling", signaling,
            "--caps", PYTHON_EXECUTION, "--profile", str(profile), "--name", name,
            "--grace", str(WORKER_GRACE_S / 2), "--exit-with-parent",
            stdout=asyncio.subprocess.PIPE, stderr=log_file,
            env={**env, environment.SECRET: secret}, start_new_session=True,
        )  # fmt: skip
    child = Child(name, proc)
    text = await _first_line(child, WORKER_READY_TIMEOUT_S, log_path)
    if not text.startswith("READY"):
        await child.stop(5)
        raise StartupError(f"{name} did not start (see {log_path}): {text}")
    child.info = dict(part.split("=", 1) for part in text.split()[1:] if "=" in part)
    child.reader = asyncio.create_task(drain(proc.stdout))
    return child


async def start_signal_process(secret: str, log_path: Path, env: dict[str, str]) -> Child:
    """``swarm-notebook signal`` on a free loopback port; ``info["url"]`` is where it listens."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarm_notebook.cli.main", "signal",
            "--host", LOOPBACK, "--port", "0", "--exit-with-parent", "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE, stderr=log_file,
            env={**env, environment.SIGNAL_SECRET: secret}, start_new_session=True,
        )  # fmt: skip
    child = Child("signaling", proc)
    text = await _first_line(child, SIGNAL_READY_TIMEOUT_S, log_path)
    if not text.startswith(SIGNAL_READY_PREFIX):
        await child.stop(5)
        raise StartupError(f"the signaling server did not start (see {log_path}): {text}")
    child.info = {"url": text.removeprefix(SIGNAL_READY_PREFIX).strip()}
    child.reader = asyncio.create_task(drain(proc.stdout))
    return child


class LocalSwarm:
    """A signaling server and ``workers`` workers, children of this process.

    Their loop runs on a thread of its own, so they are served (and stopped) the same
    from a kernel's loop, a magic's helper loop or an ``atexit`` hook.
    """

    def __init__(self, workers: int, *, room: str = LOCAL_ROOM, directory: Path | None = None):
        if not 0 <= workers <= MAX_LOCAL_WORKERS:
            raise UsageError(
                Reason.BAD_ARGUMENTS, f"workers must be 0..{MAX_LOCAL_WORKERS}, got {workers!r}"
            )
        self.workers_wanted = workers
        self.room = room
        self.secret = secrets.token_urlsafe(24)
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="swarm-notebook-local-"))
        self.server: Child | None = None
        self.workers: list[Child] = []
        self._net = LoopThread(name="swarm-notebook-local")
        self._closed = False

    @property
    def url(self) -> str:
        if self.server is None:
            raise StartupError("the local swarm is not started")
        return self.server.info["url"]

    def pids(self) -> list[int]:
        """Process ids of the server and the workers (not their sandboxes)."""
        return [c.proc.pid for c in (self.server, *self.workers) if c is not None]

    async def start(self) -> None:
        """Start the server, then the workers; on any failure stop what started."""
        self._net.start()
        atexit.register(self.close_sync)
        try:
            await self._net.call(self._start())
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        logs = self.directory / "logs"
        env = {
            **os.environ,
            environment.ICE_HOSTS: LOOPBACK,  # every peer of it is on this machine
            "PYTHONUNBUFFERED": "1",
        }
        self.server = await start_signal_process(self.secret, logs / "signal.log", env)
        started = await asyncio.gather(
            *(
                start_worker(
                    i,
                    self.url,
                    self.room,
                    self.secret,
                    self.directory / "workers" / f"worker-{i}",
                    logs / f"worker-{i}.log",
                    env,
                )
                for i in range(1, self.workers_wanted + 1)
            ),
            return_exceptions=True,
        )
        self.workers.extend(w for w in started if isinstance(w, Child))
        failures = [w for w in started if isinstance(w, BaseException)]
        if failures:
            raise failures[0]

    async def _stop(self) -> None:
        # Workers first (they hand back running tasks), then the server they talk through.
        await asyncio.gather(*(w.stop(WORKER_GRACE_S) for w in self.workers))
        if self.server is not None:
            await self.server.stop(10)

    async def close(self) -> None:
        """Stop every child and the helper thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close_sync)
        try:
            await self._net.call(self._stop())
        finally:
            await asyncio.to_thread(self._net.stop)
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def close_sync(self) -> None:
        """``close()`` from synchronous code (``atexit`` when the kernel shuts down)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close_sync)
        try:
            self._net.run_sync(self._stop(), timeout=WORKER_GRACE_S + 20)
        finally:
            self._net.stop()
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)


async def local(
    workers: int = 2,
    *,
    room: str = LOCAL_ROOM,
    name: str | None = None,
    profile: str | Path | None = None,
    timeout: float = 60.0,
) -> Coordinator:
    """Start a local swarm from this kernel and join it: the zero-configuration start.

    A signaling server on a free loopback port and ``workers`` workers that run Python for
    this room in the bubblewrap sandbox, all child processes of this kernel, behind a room
    secret made for them. The returned coordinator is joined and its workers connected;
    ``await c.leave()`` (or ``%swarm leave``, or the kernel exiting) stops them all.

    >>> c = await swarm_notebook.local(workers=2)                    # doctest: +SKIP
    >>> c.peers_frame()[["name", "capabilities", "state"]]           # doctest: +SKIP
    """
    from swarm_notebook.client import join

    swarm = LocalSwarm(workers, room=room)
    await swarm.start()
    # Every peer of this swarm is on this machine: ICE offers loopback only, as its workers do.
    config = CoordinatorConfig(mesh=MeshConfig(host_addresses=[LOOPBACK]))
    try:
        coordinator = await join(
            room,
            signaling=swarm.url,
            secret=swarm.secret,
            name=name,
            profile=profile,
            config=config,
        )
    except BaseException:
        await swarm.close()
        raise
    coordinator.close_on_leave(swarm.close)
    try:
        if workers:
            await coordinator.wait_for_peers(workers, capability=PYTHON_EXECUTION, timeout=timeout)
    except BaseException:
        await coordinator.leave()
        raise
    return coordinator
