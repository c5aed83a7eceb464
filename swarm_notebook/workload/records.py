"""What this peer remembers about tasks it delegated and served (bounded)."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TaskState(StrEnum):
    """Where a task is; the dashboard's JavaScript receives this list in its initial state."""

    SUBMITTED = "submitted"
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"


TERMINAL_STATES = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED}
)
MAX_TASK_RECORDS = 10_000


@dataclass
class TaskRecord:
    id: str
    type: str
    role: str  # "delegated" (we asked) or "served" (we ran it for a peer)
    peer: str | None = None
    state: TaskState = TaskState.SUBMITTED
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    attempts: int = 0
    # Runs inside the serving peer's backend (a Dask retry after a lost worker); None: one.
    backend_attempts: int | None = None
    error: str | None = None
    tried_peers: list[str] = field(default_factory=list)
    # What a task that has no peer yet waits for (progress lines say it), None otherwise.
    waiting: str | None = None
    submitted_mono: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies and runs for every task event.
        out = dict(self.__dict__)
        out["tried_peers"] = list(self.tried_peers)
        return out


class TaskLog:
    """The most recent task records; old finished ones fall off, counters do not."""

    def __init__(self, limit: int = MAX_TASK_RECORDS) -> None:
        self._records: dict[str, TaskRecord] = {}
        self._order: deque[str] = deque()
        self._limit = limit

    def add(self, record: TaskRecord) -> TaskRecord:
        self._records[record.id] = record
        self._order.append(record.id)
        while len(self._order) > self._limit:
            old = self._order.popleft()
            if not self._records[old].done:
                self._order.append(old)  # never forget a task still running
                if len(self._order) > 2 * self._limit:
                    break
                continue
            del self._records[old]
        return record

    def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    def all(self) -> list[TaskRecord]:
        return [self._records[i] for i in self._order if i in self._records]

    def in_flight(self) -> list[TaskRecord]:
        return [r for r in self.all() if not r.done]

    def recent(self, limit: int) -> list[TaskRecord]:
        """The ``limit`` most recently added records and any older one still running,
        oldest first: what a live view needs without copying the whole log."""
        newest = list(itertools.islice(reversed(self._order), limit))[::-1]
        older_running: list[str] = []
        if len(self._order) > limit:
            shown = set(newest)
            older_running = [
                i for i in self._order if i not in shown and not self._records[i].done
            ]
        return [self._records[i] for i in older_running + newest if i in self._records]
