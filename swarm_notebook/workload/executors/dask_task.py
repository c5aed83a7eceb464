"""``python-computation`` on a Dask cluster: what a Dask-backed worker runs for its peers.

A task is the request a sandbox child gets (code, inputs still encoded by the safe codec,
requested outputs, limits). It runs on a Dask worker through ``client.submit(run_part,
..., pure=False)``; there the sandbox child's own :class:`TaskRunner` decodes the inputs,
runs the cell, captures what it prints and builds the result or the remote traceback, so
results, outputs and tracebacks look exactly as from a plain worker. The value comes back
encoded by the safe codec: user objects are never unpickled on this peer, nor sent on
as pickle (unless the delegator is trusted with pickle, as anywhere else).

A ``map`` chunk (:func:`~swarm_notebook.workload.source.is_map_cell`) is split across the
cluster: its items go out as up to ``nthreads`` Dask tasks, and their value lists are
joined in order (one swarm message per chunk, a few Dask futures per chunk).

Dask runs code without isolation, with the rights of its workers: this executor serves
only delegators its ``allowed`` check accepts (the room's roster, ``--allow``), and the
card says ``backend: dask``, isolation ``none``. Cancelling the task (the delegator's
cancel, a timeout) cancels its Dask futures; a Dask worker lost mid-task is Dask's retry,
reported as ``backend_attempts``. Dask cannot stop a function already running in a
worker thread: a cancelled task's thread runs on until the function returns.

The Dask workers must have ``swarm_notebook`` installed (``run_part`` runs there).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from swarm_notebook.workload.executors.base import (
    OUTPUT_STREAMS,
    ErrorType,
    TaskContext,
    TaskRefused,
    failure,
)
from swarm_notebook.workload.executors.dask_cluster import OUTPUT_TOPIC, DaskCluster
from swarm_notebook.workload.executors.dask_inputs import ScatteredInputs
from swarm_notebook.workload.sandbox.bwrap import ISOLATION_NONE
from swarm_notebook.workload.sandbox.child import BoundedWriter, TaskRunner
from swarm_notebook.workload.sandbox.pool import PythonTaskData, validate_python_task
from swarm_notebook.workload.source import ARGS_NAME, is_map_cell

BACKEND_DASK = "dask"
OUTPUT_INTERVAL_S = 0.1
CANCEL_WAIT_S = 5.0
SCATTER_MIN_BYTES = 1 << 20  # inputs at least this big go to the workers by scatter


class DaskTaskExecutor:
    """Executor for ``python-computation`` whose work runs on a Dask cluster."""

    task_type = "python-computation"
    backend = BACKEND_DASK
    isolation = ISOLATION_NONE

    def __init__(
        self,
        cluster: DaskCluster,
        *,
        allowed: Callable[[str], bool] = lambda peer: False,
        default_timeout_s: float = 60.0,
        max_timeout_s: float = 600.0,
        max_output_bytes: int = 1_000_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        max_input_decode_bytes: int = 512 * 2**20,
        max_code_chars: int = 1_000_000,
        output_interval_s: float = OUTPUT_INTERVAL_S,
    ) -> None:
        self.cluster = cluster
        self.allowed = allowed
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.max_output_bytes = max_output_bytes
        self.max_result_bytes = max_result_bytes
        self.max_input_decode_bytes = max_input_decode_bytes
        self.output_interval_s = output_interval_s
        self.max_code_chars = max_code_chars
        self._scattered = ScatteredInputs()
        self._counters = {
            "tasks": 0,
            "succeeded": 0,
            "failed": 0,
            "rejected": 0,
            "refused_not_on_allowlist": 0,
            "timeouts": 0,
            "canceled": 0,
            "dask_futures": 0,
            "split_chunks": 0,
            "scattered_inputs": 0,
            "reused_scattered_inputs": 0,
            "retried_after_worker_loss": 0,
        }

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.cluster.start()

    async def close(self) -> None:
        self._scattered.clear()
        await self.cluster.close()

    @property
    def capacity(self) -> int:
        """The cluster's total threads (what the card advertises), at least 1."""
        return max(1, self.cluster.nthreads)

    def occupancy(self) -> int:
        """Tasks running on the cluster now, ours or anyone's."""
        return self.cluster.occupancy

    def stats(self) -> dict[str, Any]:
        return {"backend": BACKEND_DASK, "isolation": ISOLATION_NONE,
                **self.cluster.stats(), **self._counters}  # fmt: skip

    # -- running a task --------------------------------------------------------------

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run one task on the cluster; the result has the sandbox pool's shape."""
        if not self.allowed(ctx.delegator):
            self._counters["refused_not_on_allowlist"] += 1
            raise TaskRefused(
                ErrorType.NOT_ON_ALLOWLIST,
                "this peer runs code on a Dask cluster without isolation and serves only "
                "peers on its allowlist (the room's roster or its --allow list); ask its "
                "owner to add you",
            )
        try:
            task = validate_python_task(data, self.max_code_chars)
        except TaskRefused:
            self._counters["rejected"] += 1
            raise
        if task.session is not None:
            self._counters["rejected"] += 1
            raise TaskRefused(
                ErrorType.BAD_INPUT,
                "sessions are not kept on a Dask-backed peer (its work is spread over the "
                "cluster); run the session on a sandboxed peer",
            )
        await self.start()
        started = time.monotonic()
        self._counters["tasks"] += 1
        timeout = min(task.timeout or self.default_timeout_s, self.max_timeout_s)
        if ctx.timeout_s is not None:
            if ctx.timeout_s <= 0:
                self._counters["failed"] += 1
                self._counters["timeouts"] += 1
                return failure(
                    ErrorType.TIMEOUT, "the task's time budget ran out while it was queued"
                )
            timeout = min(timeout, ctx.timeout_s)
        parts = self._parts(task)
        result = await self._run_parts(task, parts, ctx, timeout)
        result["elapsed_s"] = time.monotonic() - started
        self._counters["succeeded" if result.get("success") else "failed"] += 1
        return result

    def _parts(self, task: PythonTaskData) -> list[dict[str, Any]]:
        """The inputs of each Dask task: one, or a map chunk's items split in order.

        The items stay encoded: an encoded list is a plain list of encoded items, so a
        slice of it is the encoding of a slice.
        """
        items = task.inputs.get(ARGS_NAME)
        if not isinstance(items, list):
            return [task.inputs]
        n = min(self.cluster.nthreads, len(items))
        if n < 2 or task.outputs or set(task.inputs) != {ARGS_NAME} or not is_map_cell(task.code):
            return [task.inputs]
        self._counters["split_chunks"] += 1
        size, extra = divmod(len(items), n)
        parts, start = [], 0
        for i in range(n):
            end = start + size + (1 if i < extra else 0)
            parts.append({ARGS_NAME: items[start:end]})
            start = end
        return parts

    def _request(self, task: PythonTaskData, inputs: dict[str, Any], ctx: TaskContext,
                 parts: int) -> dict[str, Any]:  # fmt: skip
        # The keys the sandbox child reads (pool.run sends the same request).
        return {
            "code": task.code,
            "inputs": inputs,
            "outputs": task.outputs,
            "packages": task.packages,
            "allow_pickle": ctx.allow_pickle,
            "max_output_bytes": self.max_output_bytes // parts,
            "max_result_bytes": self.max_result_bytes // parts,
            "max_input_decode_bytes": self.max_input_decode_bytes,
            "stream_output": ctx.on_output is not None,
            "output_interval_s": self.output_interval_s,
            "persistent": False,
        }

    async def _run_parts(
        self,
        task: PythonTaskData,
        parts: list[dict[str, Any]],
        ctx: TaskContext,
        timeout: float,
    ) -> dict[str, Any]:
        client = self.cluster.client
        assert client is not None
        tag = f"swarm-{ctx.task_id[:24]}-{secrets.token_hex(4)}"
        keys = [f"{tag}-{i}" for i in range(len(parts))]
        relayed: list[dict[str, str]] = [{s: "" for s in OUTPUT_STREAMS} for _ in parts]
        stop_watching = self.cluster.watch_output(tag, self._output_handler(ctx, relayed))
        self.cluster.track(keys)
        requests = [self._request(task, inputs, ctx, len(parts)) for inputs in parts]
        placed = await self._place(requests)
        futures = [
            client.submit(run_part, request, tag, i, key=key, pure=False)
            for i, (request, key) in enumerate(zip(placed, keys, strict=True))
        ]
        self._counters["dask_futures"] += len(futures)
        # Never cancel client.gather itself (its inner tasks then die unretrieved): cancel
        # the Dask futures, and the gather ends by itself.
        gathering = asyncio.ensure_future(client.gather(futures))
        try:
            done, _ = await asyncio.wait({gathering}, timeout=timeout)
            if not done:
                await self._cancel(futures, gathering)
                self._counters["timeouts"] += 1
                return failure(
                    ErrorType.TIMEOUT,
                    f"no result within {timeout:.3g} s; its Dask tasks were cancelled",
                )
            results = gathering.result()
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(futures, gathering))
            self._counters["canceled"] += 1
            raise
        except Exception as exc:
            from distributed import KilledWorker

            if not isinstance(exc, KilledWorker):
                raise  # the cluster itself failed: a refusal, retried on another peer
            return failure(
                ErrorType.WORKER_CRASHED,
                f"the task killed every Dask worker it ran on ({exc}); Dask gave up on it",
            )
        finally:
            stop_watching()
            lost = self.cluster.untrack(keys)
        result = _joined(results)
        if ctx.on_output is not None:
            # Whatever the live events did not carry (the last batch can trail the result)
            # goes out now, so the live text ends equal to the final one.
            for part, live in zip(results, relayed, strict=True):
                tail = [
                    (s, str(part.get(s) or "")[len(live[s]):])
                    for s in OUTPUT_STREAMS
                    if str(part.get(s) or "").startswith(live[s])
                ]
                tail = [(s, t) for s, t in tail if t]
                if tail:
                    ctx.on_output(tail)
        if lost:
            self._counters["retried_after_worker_loss"] += 1
        result["backend"] = BACKEND_DASK
        result["backend_attempts"] = 1 + lost
        return result

    async def _place(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The requests with their big inputs as Dask futures: scattered to the workers
        once (a ref used by many tasks stays on the cluster), so the data travels
        worker-to-worker instead of inside the task graph."""
        client = self.cluster.client
        assert client is not None
        placed: list[dict[str, Any]] = []
        for request in requests:
            inputs = dict(request["inputs"])
            for name, value in inputs.items():
                if ScatteredInputs.size_of(value) >= SCATTER_MIN_BYTES:
                    inputs[name] = await self._scattered.place(client, value)
                    self._counters["scattered_inputs"] = self._scattered.scattered
                    self._counters["reused_scattered_inputs"] = self._scattered.reused
            placed.append({**request, "inputs": inputs})
        return placed

    async def _cancel(self, futures: list[Any], gathering: asyncio.Future[Any]) -> None:
        client = self.cluster.client
        if client is not None:
            with contextlib.suppress(Exception):
                await client.cancel(futures, force=True)
        # The gather fails once its futures are cancelled; wait for that, bounded.
        await asyncio.wait({gathering}, timeout=CANCEL_WAIT_S)
        if not gathering.done():
            gathering.cancel()
        with contextlib.suppress(BaseException):
            await gathering

    def _output_handler(
        self, ctx: TaskContext, relayed: list[dict[str, str]]
    ) -> Callable[[dict[str, Any]], None]:
        # Parts run at once on different workers: only whole lines go out live, so two
        # parts' text never interleaves mid-line (the rest follows with the result).
        pending = [dict.fromkeys(OUTPUT_STREAMS, "") for _ in relayed]

        def on_event(msg: dict[str, Any]) -> None:
            part = msg.get("part")
            raw = msg.get("output")
            if ctx.on_output is None or not isinstance(part, int) or not 0 <= part < len(relayed):
                return
            if not isinstance(raw, list | tuple):  # msgpack hands lists over as tuples
                return
            chunks = [
                (c[0], c[1])
                for c in raw
                if isinstance(c, list | tuple) and len(c) == 2 and c[0] in OUTPUT_STREAMS
                and isinstance(c[1], str)
            ]  # fmt: skip
            whole = []
            for stream, text in chunks:
                lines, pending[part][stream] = split_whole_lines(pending[part][stream] + text)
                if lines:
                    relayed[part][stream] += lines
                    whole.append((stream, lines))
            if whole:
                ctx.on_output(whole)

        return on_event


def split_whole_lines(text: str) -> tuple[str, str]:
    """``text`` cut after its last line end (``\\n`` or a progress bar's ``\\r``): the
    whole lines, and the unfinished rest.

    >>> split_whole_lines("got a\\ngot")
    ('got a\\n', 'got')
    """
    cut = max(text.rfind("\n"), text.rfind("\r")) + 1
    return text[:cut], text[cut:]


def _joined(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the parts of a task, as if its items had run in one process.

    Parts run in order up to the first that failed; its failure is the task's, with the
    output of the parts before it, as a plain worker stops at the failing item.
    """
    if len(results) == 1:
        return dict(results[0])
    stdout: list[str] = []
    stderr: list[str] = []
    values: list[Any] = []
    for part in results:
        stdout.append(str(part.get("stdout") or ""))
        stderr.append(str(part.get("stderr") or ""))
        if not part.get("success"):
            return {**part, "stdout": "".join(stdout), "stderr": "".join(stderr)}
        if part.get("value_error"):
            return {**part, "stdout": "".join(stdout), "stderr": "".join(stderr),
                    "value": None, "outputs": {}}  # fmt: skip
        values.extend(part.get("value") or [])
    return {"success": True, "value": values, "outputs": {},
            "stdout": "".join(stdout), "stderr": "".join(stderr)}  # fmt: skip


# -- what runs on the Dask worker ------------------------------------------------------


class _EventPipe:
    """Sends what a part prints as Dask events (``OUTPUT_TOPIC``), at most one per
    interval (a timer sends what waits); ``finish`` sends the rest. Writers never wait
    on the network."""

    def __init__(self, tag: str, part: int) -> None:
        from distributed import get_worker

        self._worker = get_worker()
        self._tag = tag
        self._part = part
        self._pending: list[list[str]] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._interval_s = OUTPUT_INTERVAL_S
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._active = False

    def begin(self, interval_s: float) -> None:
        with self._lock:
            self._interval_s = max(0.01, interval_s)
            self._active = True

    def put(self, stream: str, text: str) -> None:
        with self._lock:
            if not self._active:
                return
            if self._pending and self._pending[-1][0] == stream:
                self._pending[-1][1] += text
            else:
                self._pending.append([stream, text])
            wait = self._interval_s - (time.monotonic() - self._last)
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._send)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self._send()

    def finish(self) -> None:
        with self._lock:
            self._active = False
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._send()

    def _send(self) -> None:
        # Taking and sending under one lock keeps batches in order across the timer's
        # thread and the task's; log_event only hands the message to the worker's loop.
        with self._send_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._last = time.monotonic()
                self._timer = None
            if batch:
                self._worker.log_event(
                    OUTPUT_TOPIC, {"task": self._tag, "part": self._part, "output": batch}
                )


class _ThreadStreams:
    """``sys.stdout``/``sys.stderr`` of a Dask worker while parts run in it: each thread
    writes to its own part's writer, so parallel parts never see each other's output."""

    def __init__(self, stream: str, fallback: Any) -> None:
        self.stream = stream
        self.fallback = fallback
        self.local = threading.local()

    def target(self) -> Any:
        return getattr(self.local, "writer", None) or self.fallback

    def write(self, s: str) -> int:
        return int(self.target().write(s))

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target(), name)


_install_lock = threading.Lock()


def _thread_streams() -> tuple[_ThreadStreams, _ThreadStreams]:
    with _install_lock:
        if not isinstance(sys.stdout, _ThreadStreams):
            sys.stdout = _ThreadStreams("stdout", sys.stdout)
        if not isinstance(sys.stderr, _ThreadStreams):
            sys.stderr = _ThreadStreams("stderr", sys.stderr)
        return sys.stdout, sys.stderr


class _DaskRunner(TaskRunner):
    """The sandbox child's runner, capturing per thread (a Dask worker runs many)."""

    @contextlib.contextmanager
    def capture(self, stdout: BoundedWriter, stderr: BoundedWriter) -> Iterator[None]:
        out, err = _thread_streams()
        out.local.writer, err.local.writer = stdout, stderr
        try:
            yield
        finally:
            out.local.writer = err.local.writer = None


def run_part(request: dict[str, Any], tag: str, part: int) -> dict[str, Any]:
    """Run one part of a task on this Dask worker: the sandbox child's request in, its
    response out (values encoded by the safe codec)."""
    pipe = _EventPipe(tag, part) if request.get("stream_output") else None
    result = _DaskRunner(pipe).run(request)
    # The child's "recycle" means "replace this process": a Dask worker is not ours to.
    result.pop("recycle", None)
    return result
