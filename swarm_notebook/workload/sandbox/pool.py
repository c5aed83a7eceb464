"""``python-computation``: run delegated Python in pre-warmed child processes, with limits.

Code never runs in the process that serves the swarm. The pool keeps ``size`` children
(:mod:`swarm_notebook.workload.sandbox.child`) started and warm; a task borrows one, sends
code and encoded inputs over the child's private socket, and gets back stdout/stderr, the
value of the last expression and the requested outputs (all encoded with
:mod:`swarm_notebook.protocol.values`, decoded only inside the child). A child that passes
the wall-clock timeout or the memory limit, or dies for any reason, is replaced.

Each task gets a fresh namespace, but a child serves many tasks for one delegating peer
only: modules a task changes stay changed for that peer's later tasks on that child.
``max_tasks_per_worker=1`` gives every task a fresh process (at the cost of a respawn).

With ``isolation="bubblewrap"`` (the default) every child runs in its own bubblewrap
sandbox (:mod:`swarm_notebook.workload.sandbox.bwrap`): new user, pid, ipc, uts and network
namespaces, read-only Python and system files, a private size-capped ``/tmp`` (its working
directory and scratch) and ``/dev/shm``, no view of the owner's home. A task's leftover
processes are found by listing the sandbox's own ``/proc`` and end with its pid namespace.
``isolation="none"`` (the owner's ``--unsafe-no-isolation``) runs children with the
owner's user rights, bounded in resources only. See docs/sandbox.md.

Example::

    pool = PythonSandboxPool(size=2, memory_limit_mb=1024)
    await pool.start()
    result = await pool.run({"code": "x = 6 * 7\\nx", "outputs": ["x"]}, ctx)
    decode_value(result["value"])  # 42
    await pool.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import keyword
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import psutil

from swarm_notebook.errors import ProtocolError, RefError, SandboxUnavailable
from swarm_notebook.protocol import oob
from swarm_notebook.workload.executors.base import (
    OUTPUT_STREAMS,
    ErrorType,
    OutputSink,
    ResidentInput,
    TaskContext,
    TaskRefused,
    failure,
    parse_task_data,
)
from swarm_notebook.workload.sandbox.bwrap import (
    ISOLATION_BUBBLEWRAP,
    ISOLATION_NONE,
    SCRATCH,
    SandboxLayout,
    bootstrap_code,
    bound_under_scratch,
    bubblewrap_problem,
    package_dir,
)
from swarm_notebook.workload.sandbox.child import FRAME_HEADER
from swarm_notebook.workload.sandbox.shm import EXT_SHM, InputFrames, ResultMaps

_log = logging.getLogger(__name__)

MIN_MEMORY_LIMIT_MB = 384  # numpy + pandas + pyarrow alone take ~150-300 MB of data segment
MAX_NAMES = 256
MAX_OUTPUT_CHUNKS = 4096  # per frame from a child; the child sends one per stream switch
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# The child gets only these variables: remote code must not read the owner's API keys.
_ENV_ALLOWLIST = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
# Threads count against RLIMIT_NPROC: room for pyarrow's and BLAS's pools per process.
_THREADS_PER_PROCESS = 8
_READ_PIECE = 1 << 20  # socket reads and writes to a child, a piece at a time
# One BLAS thread per child: the pool size is the concurrency knob on a shared machine.
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class PythonTaskData(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    inputs: dict[str, Any] = msgspec.field(default_factory=dict)
    outputs: list[str] = msgspec.field(default_factory=list)
    timeout: float | None = None
    packages: list[str] = msgspec.field(default_factory=list)
    # A session: a namespace kept in one dedicated child across tasks (see ``_session``).
    session: str | None = None
    session_op: Literal["open", "run", "close"] = "run"
    idle_timeout: float | None = None


SESSION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_ENDED_SESSIONS = 256  # why recent sessions ended, to say so when they are used again


@dataclass
class _Session:
    """A dedicated child whose namespace outlives its tasks, owned by one peer."""

    name: str
    owner: str
    worker: _Worker
    idle_timeout_s: float
    on_end: Callable[[], None] | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    runs: int = 0


class _Worker:
    """One child process (inside its sandbox, if any) and the parent's end of its socket.

    ``proc`` is what the pool started: bubblewrap or the bare interpreter. ``pid`` is the
    interpreter as this process sees it; ``init_pid`` is pid 1 of the sandbox's pid
    namespace, whose death takes every process of the sandbox with it.
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        sock: socket.socket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fd_sock: socket.socket,
    ) -> None:
        self.proc = proc
        self.sock = sock
        self.fd_sock = fd_sock  # the memfds of large inputs and results (``shm``)
        self.pid = proc.pid
        self.init_pid: int | None = None
        self.reader = reader
        self.writer = writer
        self.tasks_done = 0
        self.busy = False
        # The peer whose code this child has run: module state survives between tasks, so
        # a child never runs code for a second peer (see ``_take_idle``).
        self.owner: str | None = None
        self.memory_killed = False
        self.process_killed = False
        self.bad_output_frames = 0
        self.session: str | None = None  # a session's dedicated child: never pooled
        # Digests of the refs this child keeps decoded, oldest first, with encoded sizes.
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.scratch: str | None = None  # unsafe mode's per-child folder, removed at exit
        self.ps = psutil.Process(proc.pid)

    def enter_sandbox(self) -> None:
        """Find the interpreter inside bubblewrap: bwrap -> pid 1 (bwrap's init) -> python."""
        init = psutil.Process(self.proc.pid).children()[0]
        python = init.children()[0]
        self.init_pid, self.pid, self.ps = init.pid, python.pid, python

    def sandbox_processes(self) -> int | None:
        """How many processes live in this child's pid namespace (None: not sandboxed/gone).

        The sandbox's own /proc lists exactly its namespace, so this costs one small
        directory read instead of a scan of every process on the machine.
        """
        if self.init_pid is None:
            return None
        try:
            return sum(1 for e in os.scandir(f"/proc/{self.pid}/root/proc") if e.name.isdigit())
        except FileNotFoundError:
            return None
        except OSError:
            pass
        # Where the kernel refuses that view (ptrace rules), count the slow way: every
        # process of the namespace descends from its pid 1.
        try:
            return 1 + len(psutil.Process(self.init_pid).children(recursive=True))
        except psutil.Error:
            return None

    @property
    def alive(self) -> bool:
        if self.proc.returncode is not None or self.reader.at_eof():
            return False
        # The loop may not have seen the EOF of a child that just died; the kernel has.
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def read_frame(self, max_bytes: int) -> bytearray:
        """One frame, read into a buffer of its declared size (checked first).

        ``readexactly`` would gather the frame in the stream's buffer and then copy it out:
        a 50 MB result existed twice here. Reading in pieces keeps that buffer small.
        """
        header = await self.reader.readexactly(FRAME_HEADER.size)
        (size,) = FRAME_HEADER.unpack(header)
        if size > max_bytes:
            raise ConnectionError(f"child sent a {size}-byte frame, limit {max_bytes}")
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            piece = await self.reader.read(min(size - got, _READ_PIECE))
            if not piece:
                raise asyncio.IncompleteReadError(bytes(view[:got]), size)
            view[got : got + len(piece)] = piece
            got += len(piece)
        return buf

    async def send_frame(self, parts: list[oob.Buffer]) -> None:
        """Write one frame from its parts, a piece at a time: what the socket does not
        take at once is copied into the stream's buffer, so writing a 50 MB part in one
        call held it twice."""
        self.writer.write(FRAME_HEADER.pack(oob.size(parts)))
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, _READ_PIECE):
                self.writer.write(view[start : start + _READ_PIECE])
                await self.writer.drain()
        await self.writer.drain()

    def close_channel(self) -> None:
        """Close both sockets to the child (its process is gone or going)."""
        self.writer.close()
        self.fd_sock.close()

    def kill(self) -> None:
        """SIGKILL the child and whatever the task started.

        Sandboxed: kill pid 1 of its pid namespace; the kernel then kills every process
        in it (``setsid`` and double-fork children too) before bwrap, which waits for
        pid 1, exits. Not sandboxed: the process group, which a ``setsid`` escapes.
        """
        if self.proc.returncode is not None:
            return
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            return
        _kill_tree(self.proc.pid)

    async def terminate(self) -> None:
        """Kill and wait until the child and its sandbox are gone."""
        self.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 10.0)
        except TimeoutError:
            # bwrap did not exit after its pid 1 died: end it and whatever it started.
            _kill_tree(self.proc.pid)
            await self.proc.wait()

    async def exchange(
        self,
        request: list[oob.Buffer],
        shared: InputFrames | None,
        max_reply_bytes: int,
        decode: Callable[[bytearray, _Worker, int], Any],
        on_output: OutputSink | None,
    ) -> dict[str, Any]:
        """Send one task; hand its output frames to ``on_output``; return the result.

        ``request`` is emptied once sent: its parts are views of the inputs' buffers.
        ``shared`` are the memfds its large inputs are in: their fds go first.
        A frame and the memfds it names share ``max_reply_bytes``."""
        if shared:
            try:
                shared.send(self.fd_sock)
            except OSError as exc:  # the child is gone
                raise ConnectionError(f"cannot pass input memfds: {exc}") from exc
        await self.send_frame(request)
        request.clear()
        while True:
            frame = await self.read_frame(max_reply_bytes)
            message = decode(frame, self, max_reply_bytes - len(frame))
            del frame
            if not (isinstance(message, dict) and "output" in message):
                return message
            chunks = _output_chunks(message["output"])
            if chunks is None:
                self.bad_output_frames += 1
            elif on_output is not None:
                on_output(chunks)

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "closed its channel"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def validate_python_task(data: dict[str, Any], max_code_chars: int) -> PythonTaskData:
    """Parse and check a ``python-computation`` task; ``TaskRefused`` says what is wrong.

    Shared by every executor that runs Python tasks, so a task is refused for the same
    reasons on a sandboxed peer and on a Dask-backed one.
    """
    task = parse_task_data(data, PythonTaskData)
    if len(task.code) > max_code_chars:
        raise TaskRefused(
            ErrorType.TOO_LARGE,
            f"code has {len(task.code)} characters, limit {max_code_chars}",
        )
    for kind, names in (("input", list(task.inputs)), ("output", task.outputs)):
        if len(names) > MAX_NAMES:
            raise TaskRefused(ErrorType.BAD_INPUT, f"more than {MAX_NAMES} {kind} names")
        for name in names:
            if not name.isidentifier() or keyword.iskeyword(name):
                raise TaskRefused(
                    ErrorType.BAD_INPUT,
                    f"{kind} name {name!r:.60} is not a Python identifier",
                )
    if len(task.packages) > MAX_NAMES:
        raise TaskRefused(ErrorType.BAD_INPUT, f"more than {MAX_NAMES} packages")
    for package in task.packages:
        if not _MODULE_NAME.match(package):
            raise TaskRefused(
                ErrorType.BAD_INPUT, f"package {package!r:.60} is not a module name"
            )
    if task.timeout is not None and not (math.isfinite(task.timeout) and task.timeout > 0):
        raise TaskRefused(
            ErrorType.BAD_INPUT, "timeout must be a positive number of seconds"
        )
    if task.session is not None and not SESSION_NAME.match(task.session):
        raise TaskRefused(
            ErrorType.BAD_INPUT,
            f"session name {task.session!r:.70} must be 1-64 letters, digits, . _ -",
        )
    idle = task.idle_timeout
    if idle is not None and not (math.isfinite(idle) and idle > 0):
        raise TaskRefused(
            ErrorType.BAD_INPUT, "idle_timeout must be a positive number of seconds"
        )
    return task


class PythonSandboxPool:
    """Executor for ``python-computation``: a bounded pool of warm sandbox processes."""

    # Ref inputs arrive as ``TaskContext.resident_inputs``: children keep them between
    # their owner's tasks (see ``_with_resident``).
    takes_resident_inputs = True

    task_type = "python-computation"

    def __init__(
        self,
        size: int = 2,
        *,
        memory_limit_mb: int = 1024,
        default_timeout_s: float = 60.0,
        max_timeout_s: float = 600.0,
        max_output_bytes: int = 1_000_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        max_input_decode_bytes: int | None = None,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_code_chars: int = 1_000_000,
        max_queue: int = 32,
        max_tasks_per_worker: int | None = None,
        startup_timeout_s: float = 60.0,
        memory_poll_interval_s: float = 0.2,
        python: str = sys.executable,
        isolation: str = ISOLATION_BUBBLEWRAP,
        max_processes: int = 64,
        output_interval_s: float = 0.1,
        max_sessions: int | None = None,
        session_idle_timeout_s: float = 1800.0,
        max_session_idle_timeout_s: float = 24 * 3600.0,
        max_resident_bytes: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if memory_limit_mb < MIN_MEMORY_LIMIT_MB:
            raise ValueError(f"memory_limit_mb must be at least {MIN_MEMORY_LIMIT_MB}")
        if isolation not in (ISOLATION_BUBBLEWRAP, ISOLATION_NONE):
            raise ValueError(f"isolation must be {ISOLATION_BUBBLEWRAP!r} or {ISOLATION_NONE!r}")
        if max_processes < 2:
            raise ValueError("max_processes must be at least 2 (bwrap's init and Python)")
        self.isolation = isolation
        self.max_processes = max_processes
        # Live output: at most one batch of what a task prints per interval.
        self.output_interval_s = output_interval_s
        # Sessions: children beyond the warm pool, each a slot of this peer while open; by
        # default one slot always stays for ordinary tasks.
        self.max_sessions = max(1, size - 1) if max_sessions is None else max_sessions
        self.session_idle_timeout_s = session_idle_timeout_s
        self.max_session_idle_timeout_s = max_session_idle_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._ended_sessions: OrderedDict[str, str] = OrderedDict()
        # /tmp and /dev/shm are RAM: their caps come out of the memory limit, not on top.
        self.tmpfs_mb = max(8, memory_limit_mb // 32)
        self.size = size
        self.memory_limit_mb = memory_limit_mb
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.max_output_bytes = max_output_bytes
        self.max_result_bytes = max_result_bytes
        # What a task's inputs may take once decoded (all together): half the memory limit
        # by default, so an input that would not fit is refused as too-large, not a crash.
        self.max_input_decode_bytes = max_input_decode_bytes or memory_limit_mb * 2**20 // 2
        self.max_request_bytes = max_request_bytes
        # Refs a child keeps decoded between its owner's tasks (see ``resident``): a quarter
        # of its memory limit by default, counted in encoded bytes.
        self.max_resident_bytes = (
            memory_limit_mb * 2**20 // 4 if max_resident_bytes is None else max_resident_bytes
        )
        self.max_code_chars = max_code_chars
        self.max_queue = max_queue
        self.max_tasks_per_worker = max_tasks_per_worker
        self.startup_timeout_s = startup_timeout_s
        self.memory_poll_interval_s = memory_poll_interval_s
        self.python = python
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = oob.plain_decoder()
        self._idle: deque[_Worker] = deque()
        self._idle_changed = asyncio.Event()
        self._workers: set[_Worker] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._workdir: Path | None = None
        self._waiting = 0
        self._counters = {
            "restarts": 0,
            "tasks": 0,
            "succeeded": 0,
            "failed": 0,
            "rejected": 0,
            "timeouts": 0,
            "memory_kills": 0,
            "crashes": 0,
            "spawn_failures": 0,
            "recycled_for_isolation": 0,
            "process_kills": 0,
            "leftover_processes_killed": 0,
            "bad_output_frames": 0,
            "sessions_opened": 0,
            "sessions_expired": 0,
            "sessions_lost": 0,
            # Ref inputs a child already kept (not sent again) and ones sent to it.
            "resident_hits": 0,
            "resident_sent": 0,
            "resident_sent_bytes": 0,
            # Results whose memfds were refused (unsealed, oversized, bad references).
            "shm_refused": 0,
            # Tasks whose large inputs went to the child as memfds instead of a copy.
            "shm_inputs": 0,
        }
        self.shm_refusals: Counter[str] = Counter()
        self._last_spawn_error: str | None = None
        self._layout: SandboxLayout | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn and warm all children (idempotent); raises ``SandboxUnavailable``."""
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise SandboxUnavailable("pool is closed")
            if self.isolation == ISOLATION_BUBBLEWRAP:
                problem = await asyncio.to_thread(bubblewrap_problem)
                if problem is not None:
                    raise SandboxUnavailable(problem)
                self._layout = SandboxLayout.for_this_python(
                    tmp_mb=self.tmpfs_mb, shm_mb=self.tmpfs_mb, python=self.python
                )
            self._workdir = Path(tempfile.mkdtemp(prefix="swarm-sandbox-"))
            results = await asyncio.gather(
                *(self._spawn() for _ in range(self.size)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            for r in results:
                if isinstance(r, _Worker):
                    self._adopt(r)
            self._started = True
            self._own(self._watch_memory())
            if errors:
                await self.close()
                raise SandboxUnavailable(str(errors[0])) from errors[0]

    async def close(self) -> None:
        """Kill every child, reap it, and remove the pool's work folder."""
        self._closed = True
        for worker in list(self._workers):
            worker.kill()
        for task in list(self._background):
            task.cancel()
        for worker in list(self._workers):
            await worker.proc.wait()
            worker.close_channel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._workers.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def stats(self) -> dict[str, Any]:
        """Busy/idle children, queued tasks and counters (restarts, timeouts, ...)."""
        busy = sum(1 for w in self._workers if w.busy)
        return {
            "size": self.size,
            "isolation": self.isolation,
            "busy": busy,
            "idle": len(self._idle),
            "queued": self._waiting,
            "pids": sorted(w.pid for w in self._workers if w.alive),
            "last_spawn_error": self._last_spawn_error,
            "sessions": self.sessions(),
            "shm_refusals": dict(self.shm_refusals),
            **self._counters,
        }

    def sessions(self) -> list[dict[str, Any]]:
        """Open sessions: name, owner, runs, idle seconds, idle timeout."""
        now = time.monotonic()
        return [
            {
                "name": s.name,
                "owner": s.owner,
                "runs": s.runs,
                "idle_s": 0.0 if s.busy else round(now - s.last_used, 1),
                "idle_timeout_s": s.idle_timeout_s,
                "pid": s.worker.pid,
            }
            for s in self._sessions.values()
        ]

    # -- running a task --------------------------------------------------------------

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run one ``python-computation`` task; see the module docstring for the shape.

        Takes ``data["inputs"]`` out of ``data``: once sent, the child holds the inputs."""
        task = self._validate(data)
        # The task's own large inputs that arrived in a memfd go to the child as that
        # memfd, not a copy (``shm.InputFrames``); refs held here are written as before.
        shared = InputFrames(self.max_request_bytes)
        try:
            task = msgspec.structs.replace(task, inputs=shared.swap(task.inputs))
        except ProtocolError as exc:
            self._counters["rejected"] += 1
            raise TaskRefused(ErrorType.BAD_INPUT, f"input refused: {exc.message}") from exc
        resident = dict(ctx.resident_inputs)
        if resident and task.session is not None:
            # A session's dedicated child keeps its own namespace: it gets the values.
            loaded = {name: r.load() for name, r in resident.items()}
            task = msgspec.structs.replace(task, inputs={**task.inputs, **loaded})
            resident = {}
        fields = {
            # A ref wins over a plain input of the same name (as it always did).
            "code": task.code,
            "inputs": {k: v for k, v in task.inputs.items() if k not in resident},
            "outputs": task.outputs,
            "packages": task.packages,
            "allow_pickle": ctx.allow_pickle,
            "max_output_bytes": self.max_output_bytes,
            "max_result_bytes": self.max_result_bytes,
            "max_input_decode_bytes": self.max_input_decode_bytes,
            "stream_output": ctx.on_output is not None,
            "output_interval_s": self.output_interval_s,
            "persistent": task.session is not None,
            "compression": _compression_field(ctx),
        }
        # Parts: the inputs' Arrow bytes go to the child from the buffer they arrived in.
        request = oob.encode(fields, self._encoder)
        # The child gets the inputs; this side lets go of them (``data`` is the message
        # they arrived in), so a frame's buffer is freed once it is sent instead of
        # living through the run next to the child's copy.
        data.pop("inputs", None)
        task = msgspec.structs.replace(task, inputs={})
        # Ref inputs count as if sent: the child may not keep them yet.
        request_bytes = (
            oob.size(request) + shared.nbytes + sum(r.size for r in resident.values())
        )
        if request_bytes > self.max_request_bytes:
            self._counters["rejected"] += 1
            raise TaskRefused(
                ErrorType.TOO_LARGE,
                f"task is {request_bytes} bytes, this peer takes at most {self.max_request_bytes}",
            )
        if self._waiting >= self.max_queue:
            self._counters["rejected"] += 1
            raise TaskRefused(ErrorType.BUSY, f"{self._waiting} tasks already wait here")
        try:
            await self.start()
        except SandboxUnavailable as exc:
            self._counters["failed"] += 1
            return failure(ErrorType.SANDBOX_UNAVAILABLE, f"cannot start Python sandbox: {exc}")
        started = time.monotonic()
        budget = ctx.timeout_s if ctx.timeout_s is not None else None
        run_timeout = min(task.timeout or self.default_timeout_s, self.max_timeout_s)
        if task.session is not None:
            return await self._session(task, request, shared, ctx, run_timeout)
        self._counters["tasks"] += 1
        if budget is not None and budget <= 0:
            # Spent queued before it got here: starting it would only cost a child.
            self._counters["failed"] += 1
            self._counters["timeouts"] += 1
            return failure(ErrorType.TIMEOUT, "the task's time budget ran out while it was queued")
        worker = await self._acquire(budget, ctx.delegator)
        if worker is None:
            self._counters["failed"] += 1
            self._counters["timeouts"] += 1
            return failure(
                ErrorType.TIMEOUT, f"no sandbox became free within the task budget {budget} s"
            )
        if budget is not None:
            run_timeout = min(run_timeout, max(budget - (time.monotonic() - started), 0.001))
        if resident:
            try:
                request = self._with_resident(worker, fields, resident)
            except RefError as exc:  # the ref went away since the task arrived
                worker.busy = False
                self._release(worker)
                self._counters["failed"] += 1
                return failure(exc.reason, exc.message)
        del fields
        result = await self._run_on(worker, request, run_timeout, ctx.on_output, shared)
        kept = result.pop("resident_kept", None)
        if isinstance(kept, list):
            # The child says what it keeps: the mirror follows it, never the other way.
            for digest in [d for d in worker.resident if d not in set(kept)]:
                del worker.resident[digest]
        result["elapsed_s"] = time.monotonic() - started
        self._counters["succeeded" if result.get("success") else "failed"] += 1
        return result

    def _with_resident(
        self, worker: _Worker, fields: dict[str, Any], resident: dict[str, ResidentInput]
    ) -> list[oob.Buffer]:
        """The request for ``worker``: ref inputs it keeps are named, the others are sent.

        A ref sent here is kept by the child for its owner's later tasks (the child serves
        one owner only); the oldest kept refs are dropped to stay within
        ``max_resident_bytes``. A ref larger than that is sent and not kept.
        """
        # Everything to send is read first: a ref gone meanwhile (``RefError``) leaves the
        # mirror as the child knows it.
        missing = {
            name: ref.load()
            for name, ref in resident.items()
            if ref.digest not in worker.resident
        }
        inputs = {**fields["inputs"], **missing}
        lend: dict[str, str] = {}
        keep: dict[str, str] = {}
        for name, ref in resident.items():
            if name not in missing or ref.digest in keep.values():
                inputs.pop(name, None)  # the same ref under two names is sent once
                worker.resident.move_to_end(ref.digest)
                lend[name] = ref.digest
                self._counters["resident_hits"] += 1
                continue
            self._counters["resident_sent"] += 1
            self._counters["resident_sent_bytes"] += ref.size
            if ref.size <= self.max_resident_bytes:
                keep[name] = ref.digest
                worker.resident[ref.digest] = ref.size
        used = {ref.digest for ref in resident.values()}
        drop: list[str] = []
        while sum(worker.resident.values()) > self.max_resident_bytes:
            oldest = next((d for d in worker.resident if d not in used), None)
            if oldest is None:
                break
            del worker.resident[oldest]
            drop.append(oldest)
        return oob.encode(
            {**fields, "inputs": inputs, "resident": lend, "keep_resident": keep,
             "drop_resident": drop},
            self._encoder,
        )  # fmt: skip

    def _validate(self, data: dict[str, Any]) -> PythonTaskData:
        try:
            return validate_python_task(data, self.max_code_chars)
        except TaskRefused:
            self._counters["rejected"] += 1
            raise

    async def _acquire(self, budget: float | None, owner: str) -> _Worker | None:
        self._waiting += 1
        try:
            deadline = None if budget is None else time.monotonic() + budget
            while True:
                worker = self._take_idle(owner)
                if worker is not None:
                    worker.busy = True
                    worker.owner = owner
                    return worker
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._idle_changed.clear()
                try:
                    await asyncio.wait_for(self._idle_changed.wait(), remaining)
                except TimeoutError:
                    return None
        finally:
            self._waiting -= 1

    def _take_idle(self, owner: str) -> _Worker | None:
        """An idle child that has only run ``owner``'s code, or none yet.

        When only children owned by other peers are idle, one is recycled: its
        replacement starts clean and arrives through ``_adopt``. One peer's code can thus
        never leave state (a patched module, a global) for another peer's task.
        """
        for worker in list(self._idle):
            if not worker.alive:
                self._idle.remove(worker)  # its monitor is already replacing it
        # Its own warm child first, then a clean one (left free for other peers otherwise).
        for wanted in (owner, None):
            for worker in self._idle:
                if worker.owner == wanted:
                    self._idle.remove(worker)
                    return worker
        if self._idle:
            foreign = self._idle.popleft()
            foreign.kill()
            self._counters["recycled_for_isolation"] += 1
        return None

    def _release(self, worker: _Worker) -> None:
        self._idle.append(worker)
        self._idle_changed.set()

    async def _run_on(
        self,
        worker: _Worker,
        request: list[oob.Buffer],
        timeout: float,
        on_output: OutputSink | None = None,
        shared: InputFrames | None = None,
    ) -> dict[str, Any]:
        try:
            result = await asyncio.wait_for(
                worker.exchange(
                    request, shared, self.max_result_bytes * 2, self._decode, on_output
                ),
                timeout,
            )
            if not isinstance(result, dict):
                raise ConnectionError("the sandbox answered with something that is not a result")
        except TimeoutError:
            await worker.terminate()
            if worker.process_killed:
                return self._process_failure()
            self._counters["timeouts"] += 1
            return failure(
                ErrorType.TIMEOUT,
                f"no result within {timeout:.3g} s; the sandbox process was killed and replaced",
            )
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            msgspec.DecodeError,
            ProtocolError,
        ) as exc:
            worker.kill()
            await worker.proc.wait()
            if worker.memory_killed:
                return self._memory_failure()
            if worker.process_killed:
                return self._process_failure()
            self._counters["crashes"] += 1
            return failure(
                ErrorType.WORKER_CRASHED,
                f"the sandbox process {worker.exit_description()} while running the task "
                f"({type(exc).__name__}); it was replaced",
            )
        except BaseException:
            worker.kill()  # cancelled mid-task: the child's state is unknown
            raise
        finally:
            if shared:
                self._counters["shm_inputs"] += 1
                # Held until here so the memfd's pages are mapped somewhere (and counted)
                # while the child maps them; the child's mapping keeps them from now on.
                shared.close()
            worker.busy = False
            self._counters["bad_output_frames"] += worker.bad_output_frames
            worker.bad_output_frames = 0
        worker.tasks_done += 1
        recycle = bool(result.pop("recycle", False))
        if self.max_tasks_per_worker is not None:
            recycle = recycle or worker.tasks_done >= self.max_tasks_per_worker
        if result.get("error_type") == ErrorType.MEMORY_LIMIT:
            self._counters["memory_kills"] += 1
        leftovers = worker.sandbox_processes()
        if leftovers is not None and leftovers > 2:
            # Processes the task started outlive it only inside a sandbox we now tear
            # down: nothing of a task runs after its result is sent.
            self._counters["leftover_processes_killed"] += leftovers - 2
            recycle = True
        if recycle or self._closed:
            await worker.terminate()  # its monitor starts a fresh one (a session ends)
        elif worker.session is None:
            self._release(worker)
        return result

    def _decode(self, frame: bytearray, worker: _Worker, shm_budget: int) -> Any:
        # The result's Arrow bytes stay views of ``frame`` or of the memfds the child
        # sealed: sent on from there, not copied.
        maps = ResultMaps(worker.fd_sock, shm_budget, self._count_shm_refusal)

        def ext(code: int, data: memoryview) -> Any:
            if code == EXT_SHM:
                return maps.hook(data)
            return msgspec.msgpack.Ext(code, bytes(data))

        try:
            return oob.decode(frame, self._decoder, ext=ext)
        finally:
            maps.close()

    def _count_shm_refusal(self, reason: str) -> None:
        self._counters["shm_refused"] += 1
        self.shm_refusals[reason] += 1

    def _process_failure(self) -> dict[str, Any]:
        self._counters["process_kills"] += 1
        return failure(
            ErrorType.PROCESS_LIMIT,
            f"the task started more than {self.max_processes} processes; its sandbox was "
            "killed and replaced",
        )

    def _memory_failure(self) -> dict[str, Any]:
        self._counters["memory_kills"] += 1
        return failure(
            ErrorType.MEMORY_LIMIT,
            f"the task passed this peer's memory limit of {self.memory_limit_mb} MB; the "
            "sandbox process was killed and replaced",
        )

    # -- sessions --------------------------------------------------------------------

    async def _session(
        self,
        task: PythonTaskData,
        request: list[oob.Buffer],
        shared: InputFrames,
        ctx: TaskContext,
        timeout: float,
    ) -> dict[str, Any]:
        """Open, run in or close the session ``task.session`` (its owner only)."""
        assert task.session is not None
        name = task.session
        session = self._sessions.get(name)
        if session is not None and session.owner != ctx.delegator:
            self._counters["rejected"] += 1
            raise TaskRefused(
                ErrorType.NOT_SESSION_OWNER,
                f"session {name!r} on this peer belongs to another peer",
            )
        if task.session_op == "open":
            if session is not None:
                session.last_used = time.monotonic()
                return {"success": True, "session": name, "reopened": True}
            return await self._open_session(task, ctx)
        if session is None:
            why = self._ended_sessions.get(name, "no such session was opened here")
            return failure(
                ErrorType.SESSION_LOST,
                f"session {name!r} is gone from this peer ({why}); sessions are never "
                "re-created by themselves: open a new one",
                session_lost=True,
            )
        if task.session_op == "close":
            await self._end_session(session, "closed by its owner")
            return {"success": True, "session": name, "closed": True}
        async with session.lock:  # one task at a time in a namespace
            session.busy = True
            session.worker.busy = True
            try:
                result = await self._run_on(
                    session.worker, request, timeout, ctx.on_output, shared
                )
            finally:
                session.busy = False
                session.last_used = time.monotonic()
            session.runs += 1
        if session.worker.proc.returncode is not None or not session.worker.alive:
            await self._end_session(
                session, f"its sandbox process ended ({result.get('error_type')})"
            )
            result["session_lost"] = True
        return result

    async def _open_session(self, task: PythonTaskData, ctx: TaskContext) -> dict[str, Any]:
        assert task.session is not None
        if len(self._sessions) >= self.max_sessions:
            self._counters["rejected"] += 1
            raise TaskRefused(
                ErrorType.TOO_MANY_SESSIONS,
                f"this peer keeps at most {self.max_sessions} sessions open",
            )
        try:
            await self.start()
            worker = await self._spawn()
        except SandboxUnavailable as exc:
            return failure(ErrorType.SANDBOX_UNAVAILABLE, f"cannot start a session: {exc}")
        if task.session in self._sessions or self._closed:  # raced with another open
            await worker.terminate()
            worker.close_channel()
            raise TaskRefused(ErrorType.BUSY, f"session {task.session!r} is being opened")
        worker.session, worker.owner = task.session, ctx.delegator
        self._workers.add(worker)  # the memory and process watchdog covers it too
        idle = min(
            task.idle_timeout or self.session_idle_timeout_s, self.max_session_idle_timeout_s
        )
        session = _Session(task.session, ctx.delegator, worker, idle, ctx.on_session_end)
        self._sessions[task.session] = session
        self._ended_sessions.pop(task.session, None)
        self._counters["sessions_opened"] += 1
        self._own(self._watch_session(session))
        return {"success": True, "session": task.session, "idle_timeout_s": idle}

    async def _watch_session(self, session: _Session) -> None:
        """End the session when its child dies or it has been idle too long."""
        exited = asyncio.ensure_future(session.worker.proc.wait())
        try:
            while self._sessions.get(session.name) is session:
                idle_for = 0.0 if session.busy else time.monotonic() - session.last_used
                remaining = max(session.idle_timeout_s - idle_for, 0.05)
                done, _ = await asyncio.wait({exited}, timeout=remaining)
                if done:
                    await self._end_session(session, "its sandbox process exited")
                    return
                if not session.busy and (
                    time.monotonic() - session.last_used >= session.idle_timeout_s
                ):
                    self._counters["sessions_expired"] += 1
                    await self._end_session(
                        session, f"it expired after {session.idle_timeout_s:g} s idle"
                    )
                    return
        finally:
            exited.cancel()

    async def _end_session(self, session: _Session, why: str) -> None:
        """Forget the session, kill its child, give its slot back (once)."""
        if self._sessions.get(session.name) is not session:
            return
        del self._sessions[session.name]
        self._ended_sessions[session.name] = why
        while len(self._ended_sessions) > MAX_ENDED_SESSIONS:
            self._ended_sessions.popitem(last=False)
        if "closed" not in why and "expired" not in why:
            self._counters["sessions_lost"] += 1
        await session.worker.terminate()
        session.worker.close_channel()
        self._workers.discard(session.worker)
        if session.on_end is not None:
            try:
                session.on_end()
            except Exception:
                _log.exception("session end callback failed")

    # -- children --------------------------------------------------------------------

    def _command(self, fd: int, fd_sock: int) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and working directory of one child."""
        args = ["--fd", str(fd), "--fd-sock", str(fd_sock)]
        args += ["--max-frame-bytes", str(self.max_request_bytes)]
        assert self._workdir is not None
        if self._layout is not None:
            data_mb = self.memory_limit_mb - 2 * self.tmpfs_mb
            nproc = self.max_processes * _THREADS_PER_PROCESS
            args += ["--memory-limit-mb", str(data_mb), "--max-tasks-per-uid", str(nproc)]
            args += ["--wipe", SCRATCH, "--wipe", "/dev/shm"]
            for path in bound_under_scratch(self._layout.python_dirs):
                args += ["--keep", path]
            inside = _child_env(SCRATCH, self._layout.python_dirs)
            # bwrap's own environment is readable at /proc/1/environ inside: keep it bare.
            argv = self._layout.argv(args, inside)
            return argv, {"PATH": "/usr/bin:/bin"}, str(self._workdir)
        # Unsafe mode: still one scratch folder per child, never on sys.path (-I).
        scratch = tempfile.mkdtemp(prefix="child-", dir=self._workdir)
        args += ["--memory-limit-mb", str(self.memory_limit_mb), "--wipe", scratch]
        bootstrap = bootstrap_code(str(package_dir().parent))
        env = _child_env(scratch, ())
        return [self.python, "-I", "-c", bootstrap, *args], env, scratch

    async def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Results' memfds come on a socket of their own: the stream reader of the first
        # would drop the fds passed with its bytes (see ``shm``).
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            argv, env, cwd = self._command(child_sock.fileno(), fd_child.fileno())
            proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=(child_sock.fileno(), fd_child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the kernel must not hit tasks
            )
        except BaseException:
            parent_sock.close()
            fd_parent.close()
            raise
        finally:
            child_sock.close()
            fd_child.close()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        except BaseException:
            parent_sock.close()
            fd_parent.close()
            _kill_tree(proc.pid)
            await proc.wait()
            raise
        worker = _Worker(proc, parent_sock, reader, writer, fd_parent)
        worker.scratch = cwd if self._layout is None else None
        try:
            frame = await asyncio.wait_for(worker.read_frame(64 * 1024), self.startup_timeout_s)
            hello = self._decoder.decode(frame)
            if not (isinstance(hello, dict) and hello.get("ready")):
                error = hello.get("error") if isinstance(hello, dict) else None
                raise SandboxUnavailable(str(error or "sandbox process did not start"))
            if self._layout is not None:
                worker.enter_sandbox()
        except BaseException as exc:
            worker.kill()
            await proc.wait()
            worker.close_channel()
            if isinstance(exc, psutil.Error | IndexError):
                raise SandboxUnavailable(f"sandbox processes not found: {exc}") from exc
            if isinstance(exc, (TimeoutError, asyncio.IncompleteReadError, ConnectionError)):
                raise SandboxUnavailable(
                    f"sandbox process {worker.exit_description()} before it was ready"
                ) from exc
            raise
        return worker

    def _adopt(self, worker: _Worker) -> None:
        self._workers.add(worker)
        self._release(worker)
        self._own(self._monitor(worker))

    async def _monitor(self, worker: _Worker) -> None:
        """Reap a child when it exits and start its replacement."""
        await worker.proc.wait()
        worker.close_channel()
        self._workers.discard(worker)
        if worker.scratch is not None:
            shutil.rmtree(worker.scratch, ignore_errors=True)
        if self._closed:
            return
        backoff = 0.5
        while not self._closed:
            try:
                replacement = await self._spawn()
            except SandboxUnavailable as exc:
                self._counters["spawn_failures"] += 1
                self._last_spawn_error = str(exc)
                await asyncio.sleep(backoff)  # bounded retry rate while the environment is broken
                backoff = min(backoff * 2, 30.0)
                continue
            if self._closed:
                replacement.kill()
                await replacement.proc.wait()
                replacement.close_channel()
                return
            self._counters["restarts"] += 1
            self._adopt(replacement)
            return

    async def _watch_memory(self) -> None:
        """Kill a busy child past its RSS limit (what RLIMIT_DATA cannot see) or its
        process limit (RLIMIT_NPROC does not bind where the owner is root)."""
        limit = (self.memory_limit_mb + 64) * 1024 * 1024
        while True:
            await asyncio.sleep(self.memory_poll_interval_s)
            for worker in list(self._workers):
                if not worker.busy:
                    continue
                processes = worker.sandbox_processes()
                if processes is not None and processes > self.max_processes:
                    worker.process_killed = True
                    worker.kill()
                    continue
                try:
                    rss = worker.ps.memory_info().rss
                except psutil.Error:
                    continue
                if rss > limit:
                    worker.memory_killed = True
                    worker.kill()

    def _own(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _output_chunks(raw: Any) -> list[tuple[str, str]] | None:
    """The ``[[stream, text], ...]`` of an output frame, or None if it is not that shape.

    The child runs untrusted code that can write to its socket: check, do not assume.
    """
    if not isinstance(raw, list) or len(raw) > MAX_OUTPUT_CHUNKS:
        return None
    chunks: list[tuple[str, str]] = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and item[0] in OUTPUT_STREAMS
            and isinstance(item[1], str)
        ):
            return None
        chunks.append((item[0], item[1]))
    return chunks


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and its descendants.

    Needed while a sandbox is still being set up: bwrap's namespace init then waits for
    its parent to write its uid map, and killing bwrap alone left it waiting forever
    (seen with bwrap 0.8: its --die-with-parent was not armed yet).
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _child_env(scratch: str, python_dirs: tuple[str, ...]) -> dict[str, str]:
    """Allow-listed variables only: no owner HOME, no API keys, no PYTHONPATH."""
    env = {k: os.environ[k] for k in _ENV_ALLOWLIST if k in os.environ}
    env.update(_THREAD_ENV)
    bins = [f"{d}/bin" for d in python_dirs if os.path.isdir(f"{d}/bin")]
    if python_dirs:
        env["PATH"] = os.pathsep.join([*bins, "/usr/local/bin", "/usr/bin", "/bin"])
    else:
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    env["HOME"] = env["TMPDIR"] = scratch
    return env


def _compression_field(ctx: TaskContext) -> dict[str, Any] | None:
    """What the child needs to compress the result for the delegator's link."""
    settings = ctx.compression
    if settings is None or settings.codec is None or settings.link_bytes_per_s is None:
        return None
    return {"codec": settings.codec, "link_bytes_per_s": settings.link_bytes_per_s}
