"""What every task executor shares: the task context, the result shape, and refusals.

A delegating peer sends ``{type, data}``; the coordinator checks policy, then calls the
executor registered for ``type``. The executor's dict result goes back to the delegator.

Results are dicts with ``success: bool``; a failed result also has ``error`` (a short
human message) and ``error_type`` (a :class:`~swarm_notebook.reasons.Reason`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec

from swarm_notebook.errors import HandlerRefusal, TaskRefused
from swarm_notebook.protocol.compression import Compression
from swarm_notebook.reasons import Reason

T = TypeVar("T")
_log = logging.getLogger(__name__)


# The reason codes that travel back in ``error_type`` are ``Reason`` members; executors
# spell them ``ErrorType.X`` (kept as the executors' name for the same enum).
ErrorType = Reason

OUTPUT_STREAMS = ("stdout", "stderr")
# Receives what a running task printed, in order: ``[(stream, text), ...]``. It must not
# block: it runs on the loop that serves the task.
OutputSink = Callable[[list[tuple[str, str]]], None]


@dataclass(frozen=True, slots=True)
class ResidentInput:
    """A task input that is a ref held here: its content digest and how to read it.

    ``load()`` returns the input in its encoded (wire) form, read from the holder's store;
    an executor that keeps inputs between tasks by digest calls it only when it lacks one.
    It raises ``RefError`` if the ref went away meanwhile.
    """

    digest: str
    size: int  # encoded bytes
    load: Callable[[], Any]


def takes_resident_inputs(executor: object) -> bool:
    """Whether ``executor`` reads ``TaskContext.resident_inputs`` (else they are merged in)."""
    return bool(getattr(executor, "takes_resident_inputs", False))


@dataclass(frozen=True, slots=True)
class TaskContext:
    """Who asked for a task and how long it may take.

    ``timeout_s`` is the delegator's overall budget (queueing included); ``None`` lets the
    executor use its own default. ``allow_pickle`` is set only for peers the owner trusts.
    ``on_output``, when set, gets the task's output while it runs (executors that print
    nothing may ignore it).
    """

    task_id: str
    delegator: str
    timeout_s: float | None = None
    allow_pickle: bool = False
    on_output: OutputSink | None = None
    # Called once when a session this task opened ends (closed, expired, died): the
    # serving side gives back the slot the session held.
    on_session_end: Callable[[], None] | None = None
    # How the result's frames may be compressed on the way back to the delegator (its
    # link's measured speed); None: never.
    compression: Compression | None = None
    # Inputs that are refs held on this peer, by input name (see ``ResidentInput``): given
    # only to executors that take them; others get them decoded into ``data["inputs"]``.
    resident_inputs: Mapping[str, ResidentInput] = field(default_factory=dict)


@runtime_checkable
class Executor(Protocol):
    """Runs one kind of delegated task locally."""

    task_type: str

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run the task; failures that happen while running come back as a result dict."""
        ...

    async def close(self) -> None:
        """Release processes, sessions and files; safe to call twice."""
        ...


def failure(error_type: str, error: str, **extra: Any) -> dict[str, Any]:
    """A failed result: ``{"success": False, "error": ..., "error_type": ...}``."""
    return {"success": False, "error": error, "error_type": error_type, **extra}


def parse_task_data(data: Any, schema: type[T]) -> T:
    """Validate task data against a ``msgspec.Struct``; refuse with ``bad-input`` if wrong."""
    if not isinstance(data, dict):
        raise TaskRefused(
            ErrorType.BAD_INPUT, f"task data must be a dict, not {type(data).__name__}"
        )
    try:
        return msgspec.convert(data, schema)
    except msgspec.ValidationError as exc:
        raise TaskRefused(ErrorType.BAD_INPUT, str(exc)[:300]) from exc


async def run_executor(executor: Executor, data: Any, ctx: TaskContext) -> dict[str, Any]:
    """Run one task with ``executor``: the one path every served and local task takes.

    * The executor's result dict comes back as it is; a failure while running the user's
      work (their exception, a timeout, a missing file) is in it, and is not retried.
    * ``TaskRefused`` (input the executor refuses before running it, e.g. ``bad-input``)
      propagates: the serving side answers with that refusal.
    * Anything else the executor raises is a bug in our code, not the user's error. It is
      logged with its traceback and raised as ``HandlerRefusal`` with reason
      ``internal-error``, which the serving side counts and the delegator retries on
      another peer (within ``max_attempts``).
    """
    try:
        return await executor.run(data, ctx)
    except (TaskRefused, asyncio.CancelledError):
        raise
    except Exception as exc:
        _log.exception("executor %s crashed on task %s", executor.task_type, ctx.task_id)
        raise HandlerRefusal(
            Reason.INTERNAL_ERROR,
            f"the {executor.task_type} executor crashed: {type(exc).__name__}: {exc}"[:300],
        ) from exc
