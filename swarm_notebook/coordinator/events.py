"""The coordinator's event bus (the blueprint's EventBus).

Callbacks run on the loop that was running when they were registered (the kernel's, in a
notebook), so user code never runs on the network thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from swarm_notebook.errors import UsageError
from swarm_notebook.reasons import Reason

log = logging.getLogger(__name__)

EVENTS = (
    "swarm:reflection-shared",
    "swarm:reflection-integrated",
    "swarm:consensus-result",
    "swarm:peer-joined",
    "swarm:peer-left",
    "task:submitted",
    "task:waiting",
    "task:working",
    "task:completed",
    "task:failed",
    "task:canceled",
    "task:rejected",
    "stats:changed",
    "transfer:sampled",
)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[
            str, list[tuple[Callable[[Any], Any], asyncio.AbstractEventLoop | None]]
        ] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def on(self, event: str, callback: Callable[[Any], Any]) -> Callable[[], None]:
        """Subscribe; returns a function that unsubscribes."""
        if event not in EVENTS:
            raise UsageError(
                Reason.UNKNOWN_EVENT, f"unknown event {event!r}; known: {', '.join(EVENTS)}"
            )
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        entry = (callback, loop)
        self._subscribers.setdefault(event, []).append(entry)

        def unsubscribe() -> None:
            subs = self._subscribers.get(event, [])
            if entry in subs:
                subs.remove(entry)

        return unsubscribe

    def emit(self, event: str, payload: Any = None) -> None:
        for callback, loop in list(self._subscribers.get(event, [])):
            if loop is not None and not loop.is_closed():
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:
                    loop.call_soon_threadsafe(self._invoke, callback, payload)
                    continue
            self._invoke(callback, payload)

    def _invoke(self, callback: Callable[[Any], Any], payload: Any) -> None:
        try:
            result = callback(payload)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("event callback failed")

    def close(self) -> None:
        """Drop subscribers and cancel coroutine callbacks still running."""
        self._subscribers.clear()
        for task in list(self._tasks):
            task.cancel()
