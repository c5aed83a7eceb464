"""Helpers shared by the chaos / load / fuzz suite (``pytest -m chaos``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from swarm_notebook.client import Coordinator

TERMINAL_EVENTS = ("task:completed", "task:failed", "task:canceled", "task:rejected")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll state that has no event of its own (another process's view, a counter)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


class TerminalEvents:
    """Counts every terminal task event a coordinator emits, per task id."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.by_id: Counter[str] = Counter()
        self.states: dict[str, list[str]] = {}
        self.errors: dict[str, str | None] = {}
        self.ended_at: dict[str, float] = {}
        self.submitted: Counter[str] = Counter()
        self.working: list[dict[str, Any]] = []
        self.working_at: dict[str, float] = {}
        self._unsubscribe = [
            coordinator.on(event, self._terminal(event.split(":")[1])) for event in TERMINAL_EVENTS
        ]
        self._unsubscribe.append(coordinator.on("task:submitted", self._submitted))
        self._unsubscribe.append(coordinator.on("task:working", self._working))

    def _terminal(self, state: str) -> Callable[[dict[str, Any]], None]:
        def record(payload: dict[str, Any]) -> None:
            self.by_id[payload["id"]] += 1
            self.states.setdefault(payload["id"], []).append(state)
            self.errors[payload["id"]] = payload.get("error")
            self.ended_at[payload["id"]] = time.monotonic()

        return record

    def _working(self, payload: dict[str, Any]) -> None:
        self.working.append(payload)
        self.working_at[payload["id"]] = time.monotonic()

    def _submitted(self, payload: dict[str, Any]) -> None:
        self.submitted[payload["id"]] += 1

    @property
    def total(self) -> int:
        return sum(self.by_id.values())

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
