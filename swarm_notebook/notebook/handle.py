"""A delegated task seen from the notebook: progress while it runs, a handle to keep.

``RemoteRun`` submits one task to the coordinator's network thread and can be watched
from any thread (the kernel's loop is blocked while a ``%%swarm run`` cell waits).
``TaskHandle`` is what ``%%swarm run --no-wait`` returns: awaitable, with ``done()``,
``result()`` and ``cancel()``; when the task ends it lands the pulled variables.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from swarm_notebook.errors import WaitTimeout, short_id
from swarm_notebook.workload.records import TaskState

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

# "starting": submitted here, not yet recorded on the network thread.
RUNNING_STATES = ("starting", TaskState.SUBMITTED, TaskState.WORKING)


@dataclass(frozen=True)
class TaskProgress:
    """Where a delegated task is right now."""

    task_id: str | None
    peer: str | None
    state: str
    attempts: int
    elapsed_s: float
    peer_name: str | None = None  # the name on the peer's agent card, e.g. "worker-1"
    waiting: str | None = None  # what a task with no peer yet waits for

    @property
    def where(self) -> str:
        """``name (id…)`` when the peer has a name, else the shortened id."""
        if not self.peer:
            return ""
        return (
            f"{self.peer_name} ({short_id(self.peer)})" if self.peer_name else short_id(self.peer)
        )


class RemoteRun:
    """One delegated task with its clock: progress lines for a cell that waits on it."""

    def __init__(
        self,
        coordinator: Coordinator,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> None:
        self._started = time.monotonic()
        self._finished: float | None = None
        # Submitted to the network thread, so it goes on while the kernel's loop is
        # blocked by the waiting cell.
        self._task = coordinator.submit_task(
            task_type, data, timeout=timeout, peer=peer, requires=requires
        )
        self.future: concurrent.futures.Future[dict[str, Any]] = self._task.future
        self.future.add_done_callback(self._mark_finished)
        self.printed = {"stdout": "", "stderr": ""}  # what the cell has shown so far

    @property
    def coordinator(self) -> Coordinator:
        return self._task.coordinator

    def _mark_finished(self, _future: concurrent.futures.Future[dict[str, Any]]) -> None:
        self._finished = time.monotonic()

    @property
    def task_id(self) -> str:
        return self._task.task_id

    def elapsed(self) -> float:
        end = self._finished if self._finished is not None else time.monotonic()
        return end - self._started

    def progress(self) -> TaskProgress:
        """The task's state as the coordinator sees it (read on the network thread)."""
        record: dict[str, Any] | None = None
        if not self.future.done():
            try:
                record = self._task.record()
            except (concurrent.futures.TimeoutError, RuntimeError):
                record = None  # the network thread is busy or gone: say "starting"
        if record is None:
            return TaskProgress(self.task_id, None, "starting", 0, self.elapsed())
        peer = record.get("peer")
        return TaskProgress(
            self.task_id,
            peer,
            str(record.get("state")),
            int(record.get("attempts") or 0),
            self.elapsed(),
            self.coordinator.peer_name(peer),
            record.get("waiting"),
        )

    def new_output(self, final: dict[str, Any] | None = None) -> list[tuple[str, str]]:
        """Output not shown yet: what arrived live, or with ``final`` (the result) the rest.

        The live text is a prefix of the final one (the same bounded capture on the
        peer), so the rest is what follows it; a retried task that printed on another
        peer first is shown whole.
        """
        if final is not None:
            now = {s: str(final.get(s) or "") for s in self.printed}
        else:
            try:
                live = self.coordinator.task_output(self.task_id)
            except (concurrent.futures.TimeoutError, RuntimeError):
                live = None  # the network thread is busy or gone: next tick
            if live is None:
                return []
            now = dict(live)
        fresh: list[tuple[str, str]] = []
        for stream, text in now.items():
            shown = self.printed[stream]
            rest = text[len(shown) :] if text.startswith(shown) else text
            if rest:
                fresh.append((stream, rest))
                self.printed[stream] = text
        return fresh

    def cancel(self) -> bool:
        """Stop waiting; the coordinator records the task as canceled."""
        return self._task.cancel()


class LiveDisplay(Protocol):
    """Where a handle shows itself in Jupyter: one line, kept current by its view."""

    def show(self, progress: TaskProgress) -> None: ...


class TaskHandle:
    """A task still running on a peer (what ``%%swarm run --no-wait`` gives back).

    ``await handle`` or ``handle.result()`` returns the cell's value (and raises
    ``RemoteTaskError`` if it failed); pulled variables land in the namespace as soon as
    the task finishes, even if nobody asks for the result.

    >>> # %%swarm run --no-wait --as h   (the handle is also the cell's value)
    >>> h.done(), await h                                    # doctest: +SKIP
    """

    def __init__(
        self,
        run: RemoteRun,
        finish: Callable[[concurrent.futures.Future[dict[str, Any]]], Any],
        on_settled: Callable[[TaskHandle], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        display: Any = None,
    ) -> None:
        self._run = run
        self._finish = finish
        self._on_settled = on_settled
        self._loop = loop
        self._lock = threading.Lock()
        self._settled = False
        self._landed = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        # A LiveDisplay (Jupyter): showing the handle shows the line that ends "completed".
        self._display: LiveDisplay | None = display if hasattr(display, "show") else None
        run.future.add_done_callback(self._task_ended)

    @property
    def task_id(self) -> str:
        return self._run.task_id

    def progress(self) -> TaskProgress:
        return self._run.progress()

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The full result once finished (``stdout``, ``stderr``, ``peer``, ``duration_s``...)."""
        future = self._run.future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def done(self) -> bool:
        """True once the task finished (successfully or not) or was canceled."""
        return self._run.future.done()

    def cancel(self) -> bool:
        """Cancel the task; False if it already finished."""
        return self._run.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task ended and its variables landed; False on timeout."""
        return self._landed.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Wait (blocking) for the value of the cell's last expression."""
        try:
            self._run.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise WaitTimeout(f"task {self.task_id} still running after {timeout} s") from None
        except BaseException:
            pass  # settle() turns the failure into the error the user sees
        return self._settled_value()

    def __await__(self) -> Generator[Any, None, Any]:
        # Shielded: cancelling the awaiting cell must not cancel the remote task.
        waiter = asyncio.shield(asyncio.wrap_future(self._run.future))
        try:
            yield from waiter.__await__()
        except asyncio.CancelledError:
            if not self._run.future.cancelled():
                raise
        except Exception:
            pass
        return self._settled_value()

    def _task_ended(self, _future: concurrent.futures.Future[dict[str, Any]]) -> None:
        # Runs on the network thread: hand over to the kernel's loop when there is one, so
        # variables land between cells rather than in the middle of one.
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._settle)
                return
            except RuntimeError:
                pass  # the loop closed meanwhile
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
            try:
                self._value = self._finish(self._run.future)
            except BaseException as exc:
                self._error = exc
            finally:
                self._landed.set()
        if self._on_settled is not None:
            self._on_settled(self)

    def _settled_value(self) -> Any:
        self._settle()
        if self._error is not None:
            raise self._error
        return self._value

    def _ipython_display_(self) -> None:
        if self._display is not None:
            self._display.show(self.progress())
        else:
            print(repr(self))

    def __repr__(self) -> str:
        state = self.progress().state if not self.done() else self._final_state()
        return f"<TaskHandle task={self.task_id} state={state} elapsed={self._run.elapsed():.1f}s>"

    def _final_state(self) -> str:
        if self._run.future.cancelled():
            return TaskState.CANCELED
        if self._run.future.exception() is not None:
            return TaskState.FAILED
        if self._run.future.result().get("success"):
            return TaskState.COMPLETED
        return TaskState.FAILED
