"""The activity counters shown in ``get_stats()`` and the dashboard."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class CoordinationStats:
    """The counters ``get_stats()`` reports, moved by real events only."""

    total_tasks: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    # Failed before any peer was asked (bad input, no capable peer): counted in
    # tasks_failed too, but not against the swarm's success rate.
    tasks_not_sent: int = 0
    tasks_canceled: int = 0
    tasks_served: int = 0
    patterns_shared: int = 0
    reflections_integrated: int = 0
    consensus_requests: int = 0
    knowledge_queries: int = 0
    messages_rejected: int = 0
    last_activity: dict[str, Any] | None = None

    def touch(self, kind: str) -> None:
        self.last_activity = {"kind": kind, "timestamp": time.time()}
