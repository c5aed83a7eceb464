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
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

RUNNING_STATES = ("starting", "submitted", "working")


class SwarmNotebookError(Exception):
    """A notebook-facing error: a short ``reason`` code and a message, shown without a
    local traceback (IPython calls ``_render_traceback_``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__} [{self.reason}]: {self.message}"]


class SwarmUsageError(SwarmNotebookError):
    """The swarm was used wrongly (not joined, unknown flag, unknown variable...)."""


class RemoteTaskError(SwarmNotebookError):
    """The cell failed on a peer; the traceback shown is the remote one.

    >>> err = RemoteTaskError("ABCDEFGH" * 6, "t1", "ZeroDivisionError: division by zero",
    ...                       "Traceback...\\nZeroDivisionError: division by zero\\n")
    >>> err._render_traceback_()[0]
    'Remote traceback (peer ABCDEFGHABCDEFGH…, task t1):'
    """

    def __init__(
        self,
        peer: str | None,
        task_id: str | None,
        error: str,
        remote_traceback: str | None = None,
        error_type: str | None = None,
    ) -> None:
        self.peer = peer
        self.task_id = task_id
        self.error = error
        self.remote_traceback = remote_traceback
        self.error_type = error_type or "remote-exception"
        super().__init__(self.error_type, f"the cell failed on peer {short_id(peer)}: {error}")

    def _render_traceback_(self) -> list[str]:
        lines = [f"Remote traceback (peer {short_id(self.peer)}, task {self.task_id}):"]
        if self.remote_traceback:
            lines.extend(self.remote_traceback.rstrip("\n").splitlines())
        lines.append(f"RemoteTaskError [{self.error_type}]: {self.message}")
        return lines


def short_id(peer: str | None, width: int = 16) -> str:
    """A peer id cut for display.

    >>> short_id("A" * 52)
    'AAAAAAAAAAAAAAAA…'
    """
    if not peer:
        return "?"
    return peer if len(peer) <= width else peer[:width] + "…"


@dataclass(frozen=True)
class TaskProgress:
    """Where a delegated task is right now."""

    task_id: str | None
    peer: str | None
    state: str
    attempts: int
    elapsed_s: float
    peer_name: str | None = None  # the name on the peer's agent card, e.g. "worker-1"

    @property
    def where(self) -> str:
        """``name (id…)`` when the peer has a name, else the shortened id."""
        if not self.peer:
            return ""
        return (
            f"{self.peer_name} ({short_id(self.peer)})" if self.peer_name else short_id(self.peer)
        )


def peer_name(coordinator: Coordinator, peer_id: str | None) -> str | None:
    """The name a peer gave itself on its signed agent card (display only)."""
    view = coordinator.core.node.peer(peer_id) if peer_id else None
    return view.card.name if view is not None and view.card is not None else None


class RemoteRun:
    """One task delegated on the coordinator's network thread, observable from any thread."""

    def __init__(
        self,
        coordinator: Coordinator,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._task_id: str | None = None
        self._started = time.monotonic()
        self._finished: float | None = None
        # The swarm's objects live on the network loop; the work is submitted there so it
        # goes on while the kernel's loop is blocked by the waiting cell.
        self.future: concurrent.futures.Future[dict[str, Any]] = coordinator._runner.submit(
            self._delegate(task_type, data, timeout, peer)
        )
        self.future.add_done_callback(self._mark_finished)

    async def _delegate(
        self, task_type: str, data: Any, timeout: float | None, peer: str | None
    ) -> dict[str, Any]:
        core = self._coordinator.core
        me = asyncio.current_task()

        def remember_id(payload: Any) -> None:
            # The submitted event fires synchronously inside our own task: that is how we
            # tell our task from others delegated at the same time.
            if self._task_id is None and asyncio.current_task() is me:
                self._task_id = str(payload.get("id"))

        unsubscribe = core.events.on("task:submitted", remember_id)
        try:
            return await core.delegate_task(task_type, data, timeout=timeout, peer=peer)
        finally:
            unsubscribe()

    @property
    def coordinator(self) -> Coordinator:
        return self._coordinator

    def _mark_finished(self, _future: concurrent.futures.Future[dict[str, Any]]) -> None:
        self._finished = time.monotonic()

    @property
    def task_id(self) -> str | None:
        return self._task_id

    def elapsed(self) -> float:
        end = self._finished if self._finished is not None else time.monotonic()
        return end - self._started

    def progress(self) -> TaskProgress:
        """The task's state as the coordinator sees it (read on the network thread)."""
        task_id = self._task_id
        record: dict[str, Any] | None = None
        if task_id is not None and not self.future.done():
            core = self._coordinator.core

            def read() -> dict[str, Any] | None:
                found = core.tasks.get(task_id)
                return None if found is None else found.as_dict()

            try:
                record = self._coordinator._read(read)
            except (concurrent.futures.TimeoutError, RuntimeError):
                record = None
        if record is None:
            return TaskProgress(task_id, None, "starting", 0, self.elapsed())
        return TaskProgress(
            task_id,
            record.get("peer"),
            str(record.get("state")),
            int(record.get("attempts") or 0),
            self.elapsed(),
            peer_name(self._coordinator, record.get("peer")),
        )

    def cancel(self) -> bool:
        """Stop waiting; the coordinator records the task as canceled."""
        return self.future.cancel()


class TaskHandle:
    """A task still running on a peer (what ``%%swarm run --no-wait`` gives back).

    ``await handle`` or ``handle.result()`` returns the cell's value (and raises
    ``RemoteTaskError`` if it failed); pulled variables land in the namespace as soon as
    the task finishes, even if nobody asks for the result.

    >>> handle = _                  # the cell's value after %%swarm run --no-wait  # doctest: +SKIP
    >>> handle.done(), await handle                                                # doctest: +SKIP
    """

    def __init__(
        self,
        run: RemoteRun,
        finish: Callable[[concurrent.futures.Future[dict[str, Any]]], Any],
        on_settled: Callable[[TaskHandle], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
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
        run.future.add_done_callback(self._task_ended)

    @property
    def task_id(self) -> str | None:
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
            raise TimeoutError(f"task {self.task_id} still running after {timeout} s") from None
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

    def __repr__(self) -> str:
        state = self.progress().state if not self.done() else self._final_state()
        return f"<TaskHandle task={self.task_id} state={state} elapsed={self._run.elapsed():.1f}s>"

    def _final_state(self) -> str:
        if self._run.future.cancelled():
            return "canceled"
        if self._run.future.exception() is not None:
            return "failed"
        return "completed" if self._run.future.result().get("success") else "failed"
