"""Entry point of one sandbox child process.

Started by the pool as ``python -I -c <bootstrap> --fd N ...`` (see ``bwrap.bootstrap_code``),
normally inside bubblewrap; isolated mode keeps every working directory off ``sys.path``.

The child imports numpy, pandas and pyarrow once, then serves tasks one at a time over a
private socket (length-prefixed msgpack frames) inherited from the parent. stdin/stdout
are not used for the channel because user code prints. Each task runs in a fresh
namespace; its stdout/stderr are captured and bounded.

Memory: the child caps itself with ``RLIMIT_DATA``, not ``RLIMIT_AS``. Measured here
(numpy 2, pandas 3, pyarrow 26 with mimalloc): after imports and one Arrow round trip,
VmData is ~300 MB but VmSize ~580 MB because allocators reserve address space they never
touch, so a 512 MB ``RLIMIT_AS`` breaks the first pyarrow allocation while a 512 MB
``RLIMIT_DATA`` works and still turns runaway allocation (``bytearray``, numpy, Arrow)
into a ``MemoryError``. The parent adds an RSS watchdog for what ``RLIMIT_DATA`` does not
count (shared mappings).

The security boundary is the bubblewrap sandbox around this process (see
``sandbox/bwrap.py`` and docs/sandbox.md), not anything in here: task code runs in this
process and can change it. What this module limits only protects the task's own peer.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import collections
import contextlib
import gc
import importlib.util
import io
import linecache
import os
import resource
import shutil
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec

from swarm_notebook._util.text import clip_text
from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol import oob
from swarm_notebook.workload.sandbox import shm
from swarm_notebook.workload.sandbox.resident import ResidentValues, fresh_view

CELL_FILENAME = "<remote-cell>"
FRAME_HEADER = struct.Struct("!I")
MAX_TRACEBACK_CHARS = 32_000
MAX_ERROR_CHARS = 2_000
MAX_REPR_CHARS = 2_000
COMPILED_CELLS_KEPT = 64
PARENT_CHECK_INTERVAL_S = 1.0


class LivePipe(Protocol):
    """Where a task's output goes while it runs: this child's socket, or a Dask event."""

    def begin(self, interval_s: float) -> None: ...

    def put(self, stream: str, text: str) -> None: ...

    def finish(self) -> None: ...


class OutputPipe:
    """Sends what a task prints to the parent while it runs, in batches.

    Writers only append under a lock, so printing never waits for the socket; a flusher
    thread (started before any task, so it is not a thread the task left behind) sends
    one ``{"output": [[stream, text], ...]}`` frame per ``interval_s`` at most. The final
    result frame is sent only after ``finish()`` sent what was still pending, so the
    parent sees output and result in the order they happened.
    """

    def __init__(self, sock: socket.socket, send_lock: threading.Lock) -> None:
        self._sock = sock
        self._send_lock = send_lock
        self._encoder = msgspec.msgpack.Encoder()
        self._pending: list[list[str]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._active = False
        self.interval_s = 0.1
        threading.Thread(target=self._flush_forever, name="output-pipe", daemon=True).start()

    def begin(self, interval_s: float) -> None:
        with self._lock:
            self._pending.clear()
            self.interval_s = max(0.01, interval_s)
            self._active = True

    def put(self, stream: str, text: str) -> None:
        with self._lock:
            if not self._active:
                return
            if self._pending and self._pending[-1][0] == stream:
                self._pending[-1][1] += text  # one chunk per run of the same stream
            else:
                self._pending.append([stream, text])
        self._wake.set()

    def finish(self) -> None:
        """Stop taking output and send what is pending (on the caller's thread)."""
        with self._lock:
            self._active = False
        self._send_pending()

    def _send_pending(self) -> None:
        # Taking the batch under the send lock keeps batches in order across threads.
        with self._send_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                with contextlib.suppress(OSError):
                    send_frame(self._sock, self._encoder.encode({"output": batch}))

    def _flush_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._send_pending()
            time.sleep(self.interval_s)  # the throttle: at most one frame per interval


class BoundedWriter(io.TextIOBase):
    """A text stream that keeps at most ``limit`` bytes (UTF-8) and notes what it dropped.

    With a ``pipe``, what it keeps is also streamed live as ``stream``; the truncation
    note goes out at the end, so the live text and the final text are the same.
    """

    def __init__(self, limit: int, stream: str = "stdout", pipe: LivePipe | None = None) -> None:
        self.limit = limit
        self.stream = stream
        self.pipe = pipe
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        # A lone surrogate cannot travel as UTF-8 (it broke the result frame): escape it.
        data = s.encode("utf-8", "backslashreplace")
        room = max(self.limit - self.size, 0)
        kept = data[:room].decode("utf-8", "ignore")
        if kept:
            size = len(kept.encode("utf-8"))
            self.parts.append(kept)
            self.size += size
            if self.pipe is not None:
                self.pipe.put(self.stream, kept)
        else:
            size = 0
        self.dropped += len(data) - size
        return len(s)

    def note(self) -> str:
        return f"\n[output truncated: {self.dropped} bytes]\n" if self.dropped else ""

    def close_stream(self) -> None:
        """Stream the truncation note, if any (before the result is sent)."""
        if self.pipe is not None and self.dropped:
            self.pipe.put(self.stream, self.note())

    def getvalue(self) -> str:
        return "".join(self.parts) + self.note()


def recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes, received in place (a request's inputs are decoded from this buffer)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def send_frame(sock: socket.socket, payload: bytes | list[oob.Buffer]) -> None:
    """One length-prefixed frame; parts (``oob.encode``) are sent as they are, not joined."""
    parts: list[oob.Buffer] = [payload] if isinstance(payload, bytes) else payload
    header = FRAME_HEADER.pack(oob.size(parts))
    if len(parts) == 1 and len(parts[0]) < 65536:
        sock.sendall(header + parts[0])
        return
    sock.sendall(header)
    for part in parts:
        sock.sendall(part)


class TaskRunner:
    """Runs one request dict and builds the response dict (inside the child)."""

    def __init__(self, pipe: LivePipe | None = None) -> None:
        from swarm_notebook.protocol import values

        self.values = values
        self.pipe = pipe
        self.session_namespace: dict[str, Any] = {}
        self.baseline_threads = threading.active_count()
        # The same cell again (submit or map in a loop) skips parse and compile, ~0.1 ms.
        # Code objects are immutable, and a child serves one peer only.
        self._compiled: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()
        self.resident = ResidentValues()
        # Where large results are written (a memfd the pool maps, see ``shm``); None:
        # the value codec's own buffers.
        self.allocator: Callable[[int], Any] | None = None
        # Inputs may keep their request's buffer as their memory: only where that buffer
        # is this runner's alone (the child's own socket reads). A Dask worker reuses a
        # scattered input for many tasks: decoding it in place would let one task's
        # in-place edit reach the next.
        self.decode_in_place = False

    def compile_cell(self, code: str) -> tuple[Any, Any]:
        hit = self._compiled.get(code)
        if hit is not None:
            self._compiled.move_to_end(code)
            return hit
        compiled = _compile_cell(code)
        self._compiled[code] = compiled
        if len(self._compiled) > COMPILED_CELLS_KEPT:
            self._compiled.popitem(last=False)
        return compiled

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        limit = int(req.get("max_output_bytes", 1_000_000))
        pipe = self.pipe if req.get("stream_output") else None
        if pipe is not None:
            pipe.begin(float(req.get("output_interval_s", 0.1)))
        stdout = BoundedWriter(limit, "stdout", pipe)
        stderr = BoundedWriter(limit, "stderr", pipe)
        # A session's tasks share one namespace for the life of this (dedicated) child.
        persistent = bool(req.get("persistent"))
        namespace: dict[str, Any] = self.session_namespace if persistent else {}
        try:
            result = self.execute(req, namespace, stdout, stderr)
        except MemoryError:
            namespace.clear()  # a session loses its state too: the child is recycled
            self.resident.clear()
            gc.collect()
            result = {
                "success": False,
                "error_type": "memory-limit",
                "error": "MemoryError: the task passed this peer's memory limit",
                "recycle": True,
            }
        finally:
            linecache.cache.pop(CELL_FILENAME, None)
            stdout.close_stream()
            stderr.close_stream()
            if pipe is not None:
                pipe.finish()
        if not persistent:
            namespace.clear()
        if "keep_resident" in req or "resident" in req:
            result["resident_kept"] = self.resident.digests()
        result["stdout"] = stdout.getvalue()
        result["stderr"] = stderr.getvalue()
        if not persistent and threading.active_count() > self.baseline_threads:
            # A thread the task left running would write into the next task's capture.
            result["recycle"] = True
        return result

    def execute(
        self,
        req: dict[str, Any],
        namespace: dict[str, Any],
        stdout: BoundedWriter,
        stderr: BoundedWriter,
    ) -> dict[str, Any]:
        values = self.values
        missing = [p for p in req.get("packages", []) if not _importable(p)]
        if missing:
            return {
                "success": False,
                "error_type": "missing-package",
                "error": f"not installed on this peer: {', '.join(missing)} "
                "(peers never install packages for remote tasks; ask the owner or pick "
                "another peer)",
            }
        allow_pickle = bool(req.get("allow_pickle", False))
        max_result = int(req.get("max_result_bytes", values.DEFAULT_MAX_BYTES))
        # One budget for all inputs together, charged from declared sizes before anything
        # is allocated: many small compressed inputs cannot add up past the limit.
        budget = values.DecodeBudget(int(req.get("max_input_decode_bytes", max_result)))
        self.resident.drop(req.get("drop_resident") or ())
        try:
            # Popped: each input's wire bytes are freed once it is decoded, not after the run.
            wire_inputs = req.pop("inputs", None) or {}
            kept = req.get("keep_resident") or {}
            inputs = {}
            for name in list(wire_inputs):
                # A frame decoded in place keeps the whole request's buffer alive: not
                # for a ref this child keeps past the task (it would pin the others).
                inputs[name] = values.decode_value(
                    wire_inputs.pop(name),
                    allow_pickle=allow_pickle,
                    budget=budget,
                    exclusive=self.decode_in_place and name not in kept,
                )
        except values.ValueCodecError as exc:
            kind = "too-large" if exc.reason == "too-large" else "bad-input"
            return {"success": False, "error_type": kind, "error": f"input: {exc}"}
        # Refs this child keeps for its owner's next tasks: it holds the decoded value, the
        # task works on its own view (see ``resident``).
        for name, digest in (req.get("keep_resident") or {}).items():
            if name in inputs:
                self.resident.keep(digest, inputs[name])
                inputs[name] = fresh_view(inputs[name])
        for name, digest in (req.get("resident") or {}).items():
            try:
                inputs[name] = self.resident.lend(digest)
            except KeyError:
                # The pool's mirror and this child disagree: never guess, start afresh.
                return {
                    "success": False,
                    "error_type": "worker-crashed",
                    "error": f"input {name!r}: its ref is not kept in this sandbox",
                    "recycle": True,
                }
        code = req["code"]
        try:
            body, last = self.compile_cell(code)
        except (SyntaxError, ValueError) as exc:
            text = "".join(traceback.format_exception_only(type(exc), exc))
            return {
                "success": False,
                "error_type": "syntax-error",
                "error": text.strip().splitlines()[-1][:MAX_ERROR_CHARS],
                "traceback": text[:MAX_TRACEBACK_CHARS],
            }
        linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)
        namespace.update(__name__="__remote__", __builtins__=dict(builtins.__dict__))
        namespace.update(inputs)
        value: Any = None
        try:
            with self.capture(stdout, stderr):
                exec(body, namespace)
                if last is not None:
                    value = eval(last, namespace)
        except MemoryError:
            raise
        except BaseException as exc:  # SystemExit and KeyboardInterrupt from user code too
            return _exception_result(exc)
        result: dict[str, Any] = {"success": True}
        encoder_budget = max_result
        compression = _compression(req.get("compression"))
        try:
            result["value"] = values.encode_value(
                value,
                allow_pickle=allow_pickle,
                max_bytes=encoder_budget,
                compression=compression,
                allocator=self.allocator,
            )
        except values.ValueCodecError as exc:
            # The code ran; say plainly why its value did not travel instead of failing.
            result["value"] = None
            result["value_error"] = str(exc)
            result["value_repr"] = _safe_repr(value)
        missing_outputs = [n for n in req.get("outputs", []) if n not in namespace]
        if missing_outputs:
            return {
                "success": False,
                "error_type": "missing-output",
                "error": f"the code did not define requested outputs: {', '.join(missing_outputs)}",
            }
        outputs = {}
        for name in req.get("outputs", []):
            try:
                outputs[name] = values.encode_value(
                    namespace[name],
                    allow_pickle=allow_pickle,
                    max_bytes=encoder_budget,
                    compression=compression,
                    allocator=self.allocator,
                )
            except values.ValueCodecError as exc:
                error_type = "result-too-large" if exc.reason == "too-large" else "bad-input"
                return {
                    "success": False,
                    "error_type": error_type,
                    "error": f"output {name!r}: {exc}",
                }
        result["outputs"] = outputs
        return result


    @contextlib.contextmanager
    def capture(self, stdout: BoundedWriter, stderr: BoundedWriter) -> Iterator[None]:
        """Send what the cell prints to ``stdout``/``stderr`` (this child runs one task at a
        time, so swapping ``sys.stdout`` is enough; a threaded host overrides this)."""
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield


def _compression(field: Any) -> Any:
    """The parent's compression settings for the result (see ``pool._compression_field``)."""
    if not isinstance(field, dict):
        return None
    from swarm_notebook.protocol.compression import Compression

    return Compression(link_bytes_per_s=float(field["link_bytes_per_s"]), codec=str(field["codec"]))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _compile_cell(code: str) -> tuple[Any, Any]:
    """Compile like a notebook cell: the last expression, if any, gives the value."""
    tree = ast.parse(code, filename=CELL_FILENAME, mode="exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_stmt = tree.body.pop()
        assert isinstance(last_stmt, ast.Expr)
        last_expr = ast.Expression(last_stmt.value)
        last = compile(last_expr, CELL_FILENAME, "eval")
    return compile(tree, CELL_FILENAME, "exec"), last


def _exception_result(exc: BaseException) -> dict[str, Any]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next  # drop the runner's own frames: the user sees only the cell
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {
        "success": False,
        "error_type": "remote-exception",
        "error": error[:MAX_ERROR_CHARS],
        "traceback": clip_text(text, MAX_TRACEBACK_CHARS),
    }


def _safe_repr(value: Any) -> str:
    try:
        return clip_text(repr(value), MAX_REPR_CHARS)
    except Exception as exc:
        return f"<repr failed: {type(exc).__name__}>"


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone, even if a task is spinning in a C loop."""
    while True:
        time.sleep(PARENT_CHECK_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def wipe(folders: list[str], keep: frozenset[str] = frozenset()) -> None:
    """Empty the scratch folders, so files (RAM, in a tmpfs) do not outlive their task.

    ``keep`` are read-only binds inside a scratch folder (the interpreter, when it lives
    under /tmp): they and the folders leading to them stay; everything else goes.
    """
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.path in keep:
                continue
            if any(k.startswith(entry.path + "/") for k in keep):
                wipe([entry.path], keep)
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)


def serve(
    sock: socket.socket,
    max_frame_bytes: int,
    scratch: list[str] | None = None,
    keep: frozenset[str] = frozenset(),
    fd_sock: socket.socket | None = None,
) -> None:
    """Serve tasks on ``sock``; with ``fd_sock``, large results go in memfds (``shm``)."""
    encoder = msgspec.msgpack.Encoder()
    decoder = oob.plain_decoder()
    send_lock = threading.Lock()
    runner = TaskRunner(OutputPipe(sock, send_lock))
    runner.decode_in_place = True  # each request is read into a buffer of its own
    send_frame(sock, encoder.encode({"ready": True, "pid": os.getpid()}))
    while True:
        header = recv_exact(sock, FRAME_HEADER.size)
        if header is None:
            return
        (size,) = FRAME_HEADER.unpack(header)
        if size > max_frame_bytes:
            return  # the parent never sends this; a broken channel ends the child
        payload = recv_exact(sock, size)
        if payload is None:
            return
        # Inputs sent out of band are views of ``payload``: it lives until they are decoded,
        # or as long as the frames decoded in place from it (it is this child's alone).
        # Large ones came as memfds: views of this child's copy-on-write mappings of them.
        try:
            request = _decode_request(payload, decoder, fd_sock, max_frame_bytes)
        except ProtocolError as exc:
            # Fds of a refused request may still wait on the socket: never read them as
            # the next request's, start afresh.
            with send_lock:
                send_frame(sock, encoder.encode(_refused(exc)))
            return
        del payload
        buffers = shm.ResultBuffers() if fd_sock is not None else None
        runner.allocator = buffers.allocate if buffers is not None else None
        response = runner.run(request)
        runner.allocator = None
        if not request.get("persistent"):
            wipe(scratch or [], keep)  # a session keeps its files for its next call
        recycle = bool(response.get("recycle"))
        fds: list[int] = []
        try:
            if buffers is not None:
                response, fds = buffers.pack(response)
            # Parts: the result's Arrow bytes go out from the buffer Arrow wrote them to
            # (or travel as sealed memfds, named in the head).
            frame: bytes | list[oob.Buffer] = oob.encode(response, encoder)
        except (MemoryError, BufferError, OSError) as exc:
            fds = []
            recycle = True
            frame = encoder.encode(
                {
                    "success": False,
                    "error_type": "memory-limit",
                    "recycle": True,
                    "error": f"{type(exc).__name__} while packing the result",
                }
            )
        with send_lock:
            if fd_sock is not None and fds:
                shm.send_fds(fd_sock, fds)  # before the frame that names them
            send_frame(sock, frame)
        if buffers is not None:
            buffers.close()
        # Not kept while the child waits for its next task: the result held a frame.
        del request, response, frame, buffers
        if recycle:
            return


def _decode_request(
    payload: bytearray,
    decoder: msgspec.msgpack.Decoder[Any],
    fd_sock: socket.socket | None,
    max_bytes: int,
) -> Any:
    """One request, its memfd inputs mapped (checked by ``shm.InputMaps``)."""
    if fd_sock is None:
        return oob.decode(payload, decoder, owned=True)
    maps = shm.InputMaps(fd_sock, max_bytes)

    def ext(code: int, data: memoryview) -> Any:
        if code == shm.EXT_SHM_INPUT:
            return maps.hook(data)
        return msgspec.msgpack.Ext(code, bytes(data))

    try:
        return oob.decode(payload, decoder, owned=True, ext=ext)
    finally:
        maps.close()


def _refused(exc: ProtocolError) -> dict[str, Any]:
    return {
        "success": False,
        "error_type": "bad-input",
        "error": f"the sandbox refused the request ({exc.reason}): {exc.message}",
        "recycle": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--fd-sock", type=int, default=-1, help="where result memfds go")
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    parser.add_argument("--max-frame-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument(
        "--max-tasks-per-uid",
        type=int,
        default=0,
        help="RLIMIT_NPROC (processes and threads); only meaningful in a user namespace",
    )
    parser.add_argument("--wipe", action="append", default=[], help="scratch emptied per task")
    parser.add_argument(
        "--keep", action="append", default=[], help="a read-only bind inside a scratch folder"
    )
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    parent_pid = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        # Pre-warm: the first task must not pay for these imports.
        import numpy  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow
        import pyarrow.ipc  # noqa: F401

        if args.memory_limit_mb > 0:
            limit = args.memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        if args.max_tasks_per_uid > 0:
            # Counted per uid of this sandbox's own user namespace, so set here, after
            # bwrap made it; the owner's other processes do not count against it.
            nproc = args.max_tasks_per_uid
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    except Exception as exc:
        message = f"sandbox start failed: {type(exc).__name__}: {exc}"
        send_frame(sock, msgspec.msgpack.encode({"ready": False, "error": message[:1000]}))
        return 2
    fd_sock = socket.socket(fileno=args.fd_sock) if args.fd_sock >= 0 else None
    serve(sock, args.max_frame_bytes, args.wipe, frozenset(args.keep), fd_sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
