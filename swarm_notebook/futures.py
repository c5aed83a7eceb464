"""Futures for delegated functions: the API ipyparallel and Dask users already know.

``TaskFuture`` is a ``concurrent.futures.Future`` (so ``concurrent.futures.wait`` and
``as_completed`` accept it) that is also awaitable. It is created already knowing its task
id; ``result()`` gives the function's return value as if it ran here, or raises
``RemoteTaskError`` with the remote traceback and the peer's name and id. ``cancel()``
stops the task where it runs: the worker kills its sandbox process and frees the slot,
and nothing is retried after a cancel.

>>> fut = c.submit(total, df, column="v")         # doctest: +SKIP
>>> fut.task_id, fut.state                         # doctest: +SKIP
('4f0c…', 'working')
>>> await fut                                      # doctest: +SKIP
42.0
>>> c.gather(c.map(square, range(100), chunksize=10))[:3]   # doctest: +SKIP
[0, 1, 4]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol

from swarm_notebook.errors import RemoteTaskError, UsageError
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.records import TaskState
from swarm_notebook.workload.refs import KEPT_RESULT, RemoteRef
from swarm_notebook.workload.source import ARGS_NAME, KWARGS_NAME, ShippedFunction

PYTHON_COMPUTATION = "python-computation"


class StartedTask(Protocol):
    """A task already on its way: its id and the future of its result dict."""

    task_id: str
    future: concurrent.futures.Future[dict[str, Any]]


class TaskSubmitter(Protocol):
    """What futures need from a coordinator: start a task, and read its record."""

    def submit_task(
        self,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        max_attempts: int | None = None,
        requires: Mapping[str, str] | None = None,
        on_output: Callable[[str, str], Any] | None = None,
    ) -> StartedTask: ...

    def task_record(self, task_id: str) -> dict[str, Any] | None: ...

    def task_output(self, task_id: str) -> dict[str, str] | None: ...

    def peer_name(self, peer_id: str | None) -> str | None: ...

    def ship(self, fn: Callable[..., Any]) -> ShippedFunction:
        """``fn`` as source for a peer (``ship_function``, cached by the submitter)."""
        ...


@dataclass(frozen=True)
class SubmitOptions:
    """Where and how a submitted function may run (shared by ``submit`` and ``map``)."""

    peer: str | None = None
    timeout: float | None = None
    retries: int | None = None  # attempts on other peers after a peer fails (not user errors)
    requires: Mapping[str, str] | None = None  # package versions, e.g. {"pandas": ">=2.2"}
    on_output: Callable[[str, str], Any] | None = None  # (stream, text) while it runs
    keep: bool = False  # the return value stays on the peer: the future gives a RemoteRef
    keep_replicas: int = 1  # how many peers hold a kept return value (copied peer to peer)

    @property
    def max_attempts(self) -> int | None:
        if self.retries is None:
            return None
        if self.retries < 0:
            raise UsageError(Reason.BAD_ARGUMENTS, "retries must be 0 or more")
        return self.retries + 1


Translate = Callable[[BaseException, "dict[str, Any] | None"], BaseException]


class TaskFuture(concurrent.futures.Future[Any]):
    """One delegated call: awaitable, and a ``concurrent.futures.Future``."""

    def __init__(self, submitter: TaskSubmitter, task_id: str, function: str) -> None:
        super().__init__()
        self.translate: Translate | None = None
        self.task_id = task_id
        self.function = function
        self._submitter = submitter
        self._inner: concurrent.futures.Future[dict[str, Any]] | None = None
        self._reply: dict[str, Any] | None = None
        self._lock = threading.Lock()

    # -- what is known while it runs --------------------------------------------------

    @property
    def state(self) -> str:
        """``submitted``, ``working``, ``completed``, ``failed``, ``canceled``..."""
        if self.cancelled():
            return TaskState.CANCELED
        if self._reply is not None:
            return str(self._reply.get("state") or TaskState.COMPLETED)
        record = self._submitter.task_record(self.task_id)
        return str(record["state"]) if record else TaskState.SUBMITTED

    @property
    def peer(self) -> str | None:
        """The id of the peer running (or that ran) the task."""
        if self._reply is not None and self._reply.get("peer"):
            return str(self._reply["peer"])
        record = self._submitter.task_record(self.task_id)
        return record.get("peer") if record else None

    @property
    def stdout(self) -> str:
        """What the function printed: grows while it runs, complete once it is done."""
        return self._printed("stdout")

    @property
    def stderr(self) -> str:
        return self._printed("stderr")

    def _printed(self, stream: str) -> str:
        if self._reply is not None:
            return str(self._reply.get(stream) or "")
        live = self._submitter.task_output(self.task_id)
        return live[stream] if live else ""

    def __repr__(self) -> str:
        return f"<TaskFuture {self.function}() task={self.task_id[:8]} state={self.state}>"

    # -- lifecycle --------------------------------------------------------------------

    def _attach(self, inner: concurrent.futures.Future[dict[str, Any]]) -> None:
        self._inner = inner
        inner.add_done_callback(self._settle)

    def _settle(self, inner: concurrent.futures.Future[dict[str, Any]]) -> None:
        with self._lock:
            if self.done():
                return
            if inner.cancelled():
                super().cancel()
                self.set_running_or_notify_cancel()
                return
            exc = inner.exception()
            if exc is not None:
                self.set_exception(self._translated(exc, None))
                return
            reply = inner.result()
            self._reply = reply
            outcome = self._outcome(reply)
            if isinstance(outcome, BaseException):
                self.set_exception(self._translated(outcome, reply))
            else:
                self.set_result(outcome)

    def _translated(self, error: BaseException, reply: dict[str, Any] | None) -> BaseException:
        return error if self.translate is None else self.translate(error, reply)

    def _outcome(self, reply: dict[str, Any]) -> Any:
        if reply.get("success"):
            return reply.get("value")
        peer = reply.get("peer")
        return RemoteTaskError(
            peer,
            self.task_id,
            str(reply.get("error") or "the task failed"),
            reply.get("traceback"),
            reply.get("error_type"),
            peer_name=self._submitter.peer_name(peer),
        )

    def cancel(self) -> bool:
        """Stop the task wherever it is; ``False`` if it already finished."""
        with self._lock:
            if self.done():
                return False
            inner = self._inner
        if inner is not None:
            inner.cancel()  # cancels the delegation on the network loop, and the remote run
        with self._lock:
            if self.done():
                return self.cancelled()
            super().cancel()
            self.set_running_or_notify_cancel()
            return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()


class ItemFuture(concurrent.futures.Future[Any]):
    """One item of a ``map`` chunk; cancelling it cancels its whole chunk."""

    def __init__(self, chunk: TaskFuture, index: int) -> None:
        super().__init__()
        self.chunk = chunk
        self.index = index
        chunk.add_done_callback(self._settle)

    @property
    def task_id(self) -> str:
        return self.chunk.task_id

    @property
    def state(self) -> str:
        return self.chunk.state

    @property
    def peer(self) -> str | None:
        return self.chunk.peer

    def _settle(self, chunk: concurrent.futures.Future[Any]) -> None:
        if self.done():
            return
        if chunk.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
            return
        exc = chunk.exception()
        if exc is not None:
            self.set_exception(exc)
        else:
            self.set_result(chunk.result()[self.index])

    def cancel(self) -> bool:
        return self.chunk.cancel() or self.cancelled()

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<ItemFuture #{self.index} of {self.chunk!r}>"


AnyFuture = TaskFuture | ItemFuture


def submit(
    submitter: TaskSubmitter,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    options: SubmitOptions,
) -> TaskFuture:
    """Ship ``fn`` with its arguments to a capable peer; returns at once."""
    shipped = submitter.ship(fn)
    # Plain values: the coordinator encodes python-computation inputs with the safe codec.
    # Refs welcome: each travels as its own input (resolved where the data already is)
    # and a prelude puts it back in its argument's place.
    plain_args, plain_kwargs = list(args), dict(kwargs)
    inputs: dict[str, Any] = {}
    prelude: list[str] = []
    for where, container in (("args", plain_args), ("kwargs", plain_kwargs)):
        keys = range(len(container)) if where == "args" else list(container)
        for key in keys:
            value = container[key]  # type: ignore[index]
            if isinstance(value, RemoteRef):
                name = f"__swarm_ref_{len(inputs)}__"
                inputs[name] = value
                container[key] = None  # type: ignore[index]
                target = ARGS_NAME if where == "args" else KWARGS_NAME
                prelude.append(f"{target}[{key!r}] = {name}")
    inputs.update({ARGS_NAME: plain_args, KWARGS_NAME: plain_kwargs})
    cell = shipped.cell()
    data: dict[str, Any] = {"inputs": inputs}
    if options.keep_replicas != 1 and not options.keep:
        raise UsageError(Reason.BAD_ARGUMENTS, "keep_replicas needs keep=True")
    if options.keep:
        head, _, call = cell.rstrip("\n").rpartition("\n")
        cell = f"{head}\n{KEPT_RESULT} = {call}\n"
        # keep_replicas and _function stay with the coordinator (a lost ref names them).
        data.update(
            outputs=[KEPT_RESULT],
            keep=[KEPT_RESULT],
            keep_replicas=options.keep_replicas,
            _function=shipped.name,
        )
    # The prelude is kept to one line: remote tracebacks shift by one line at most.
    data["code"] = "; ".join(prelude) + "\n" + cell if prelude else cell
    return _start(submitter, shipped.name, data, options)


class MapProgress:
    """One progress bar over a ``map``'s items; its postfix counts items per peer.

    The bar moves as chunks finish (on the swarm's thread; tqdm locks its own state) and
    closes when the last one has.
    """

    def __init__(self, submitter: TaskSubmitter, total: int, bar: Any = None) -> None:
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="map", unit="item")
        self._bar = bar
        self._submitter = submitter
        self._left = total
        self._per_peer: Counter[str] = Counter()
        self._lock = threading.Lock()

    def track(self, chunk: TaskFuture, size: int) -> None:
        chunk.add_done_callback(lambda f: self._chunk_done(chunk, size))

    def _chunk_done(self, chunk: TaskFuture, size: int) -> None:
        if chunk.cancelled():
            who = "canceled"
        elif chunk.exception() is not None:
            who = "failed"
        else:
            peer = chunk.peer
            who = self._submitter.peer_name(peer) or (peer or "?")[:8]
        with self._lock:
            self._per_peer[who] += size
            self._left -= size
            postfix = dict(sorted(self._per_peer.items()))
            last = self._left <= 0
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(size)
        if last:
            self._bar.close()

    @property
    def per_peer(self) -> dict[str, int]:
        with self._lock:
            return dict(self._per_peer)


def _show_progress(progress: bool | None) -> bool:
    """Default: a bar in an IPython shell (the notebook), none in scripts and tests."""
    if progress is not None:
        return progress
    ipython = sys.modules.get("IPython")
    return bool(ipython is not None and ipython.get_ipython() is not None)


def map_items(
    submitter: TaskSubmitter,
    fn: Callable[..., Any],
    iterables: Sequence[Iterable[Any]],
    options: SubmitOptions,
    chunksize: int | None = None,
    progress: bool | None = False,
    bar: Any = None,
) -> list[ItemFuture]:
    """``fn`` over the zipped ``iterables``, ``chunksize`` items per task, results in order.

    With ``progress`` one bar (tqdm, or ``bar`` if given) follows the items, counting
    them per peer.
    """
    if not iterables:
        raise UsageError(Reason.BAD_ARGUMENTS, "map needs at least one iterable")
    shipped = submitter.ship(fn)
    items = [list(group) for group in zip(*iterables, strict=False)]
    if not items:
        return []
    size = chunksize or _default_chunksize(len(items))
    if size < 1:
        raise UsageError(Reason.BAD_ARGUMENTS, "chunksize must be 1 or more")
    futures: list[ItemFuture] = []
    code = shipped.map_cell()
    tracker = MapProgress(submitter, len(items), bar) if _show_progress(progress) else None
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        data = {"code": code, "inputs": {ARGS_NAME: chunk}}
        task = _start(submitter, shipped.name, data, options)
        if tracker is not None:
            tracker.track(task, len(chunk))
        futures += [ItemFuture(task, i) for i in range(len(chunk))]
    return futures


def _default_chunksize(n: int) -> int:
    # Enough chunks to spread over a room of workers and show progress, few enough that a
    # message per chunk costs nothing next to the work.
    return max(1, min(256, n // 32))


def start_task(
    submitter: TaskSubmitter,
    function: str,
    data: dict[str, Any],
    options: SubmitOptions,
    translate: Translate | None = None,
) -> TaskFuture:
    """Start one python-computation task and return its future (``translate`` maps its
    failure to the error the caller should see, e.g. a lost session)."""
    future = _start(submitter, function, data, options)
    future.translate = translate
    return future


def _start(
    submitter: TaskSubmitter, function: str, data: dict[str, Any], options: SubmitOptions
) -> TaskFuture:
    task = submitter.submit_task(
        PYTHON_COMPUTATION,
        data,
        timeout=options.timeout,
        peer=options.peer,
        max_attempts=options.max_attempts,
        requires=options.requires,
        on_output=options.on_output,
    )
    future = TaskFuture(submitter, task.task_id, function)
    future._attach(task.future)
    return future


def gather(futures: Iterable[AnyFuture], timeout: float | None = None) -> list[Any]:
    """Every result, in order; raises the first error (like ``Client.gather``)."""
    pending = list(futures)
    _, not_done = concurrent.futures.wait(pending, timeout=timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(pending)} tasks not finished in {timeout} s")
    return [f.result() for f in pending]


def wait(
    futures: Iterable[AnyFuture],
    timeout: float | None = None,
    return_when: str = concurrent.futures.ALL_COMPLETED,
) -> tuple[set[Any], set[Any]]:
    """``concurrent.futures.wait`` for task futures: ``(done, not_done)``."""
    return concurrent.futures.wait(list(futures), timeout=timeout, return_when=return_when)


class as_completed:  # named like concurrent.futures.as_completed, and used the same way
    """Futures in the order they finish; iterate with ``for`` or ``async for``.

    >>> for fut in swarm_notebook.as_completed(futures):   # doctest: +SKIP
    ...     print(fut.result())
    """

    def __init__(self, futures: Iterable[AnyFuture], timeout: float | None = None) -> None:
        self._futures = list(futures)
        self._timeout = timeout

    def __iter__(self) -> Iterator[AnyFuture]:
        by_id = {id(f): f for f in self._futures}
        for done in concurrent.futures.as_completed(self._futures, timeout=self._timeout):
            yield by_id[id(done)]

    async def __aiter__(self) -> AsyncIterator[AnyFuture]:
        wrapped = {asyncio.wrap_future(f): f for f in self._futures}
        pending = set(wrapped)
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise TimeoutError(f"{len(pending)} tasks not finished in {self._timeout} s")
            for aw in done:
                yield wrapped[aw]


class SwarmExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose work runs on the swarm's peers.

    >>> with c.executor() as pool:                       # doctest: +SKIP
    ...     list(pool.map(square, range(10)))
    """

    def __init__(self, submitter: TaskSubmitter, options: SubmitOptions) -> None:
        self._submitter = submitter
        self._options = options
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._shutdown = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = submit(self._submitter, fn, args, kwargs, self._options)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            futures = map_items(self._submitter, fn, iterables, self._options, chunksize)
            self._futures.update(futures)
        for future in futures:
            future.add_done_callback(self._futures.discard)

        def results() -> Iterator[Any]:
            try:
                for future in futures:
                    yield future.result(timeout=timeout)
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; the swarm itself stays joined."""
        with self._lock:
            self._shutdown = True
            outstanding = list(self._futures)
        if cancel_futures:
            for future in outstanding:
                future.cancel()
        if wait:
            concurrent.futures.wait(outstanding)
