"""Summary of a coordinator snapshot for dashboards (what ``get_status()`` returns)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

DashboardState = Literal["active", "idle", "disabled"]


class DashboardStatus(TypedDict):
    """What a dashboard header shows about the swarm at a glance."""

    state: DashboardState
    primary_metric: str
    secondary_metric: str
    last_activity: float | None
    message: str | None
    success_rate: int | None  # None (shown as "-"): no task has finished yet


def _count(snapshot: Mapping[str, Any], key: str) -> int:
    value = snapshot.get(key) or 0
    return int(value)


def success_rate(snapshot: Mapping[str, Any]) -> int | None:
    """Percentage of finished delegated tasks that completed, rounded; None before any.

    Only tasks a peer was asked to run count: a user's cancel (``tasks_canceled``) and a
    local error that never left this notebook (``tasks_not_sent``: bad input, no
    capable peer) say nothing about the swarm. Shown as "-" while None.

    >>> success_rate({"total_tasks": 4, "tasks_completed": 3, "tasks_failed": 1})
    75
    >>> success_rate({"total_tasks": 9, "tasks_completed": 1, "tasks_failed": 3,
    ...               "tasks_not_sent": 2, "tasks_canceled": 5})
    50
    >>> success_rate({"total_tasks": 0}) is None
    True
    """
    completed = _count(snapshot, "tasks_completed")
    failed = max(0, _count(snapshot, "tasks_failed") - _count(snapshot, "tasks_not_sent"))
    if completed + failed <= 0:
        return None
    return round(completed / (completed + failed) * 100)


def format_rate(rate: int | None) -> str:
    """A success rate for people: ``"75 %"``, or ``"-"`` before any task finished.

    >>> format_rate(None), format_rate(75)
    ('-', '75 %')
    """
    return "-" if rate is None else f"{rate} %"


def dashboard_status(snapshot: Mapping[str, Any]) -> DashboardStatus:
    """Summarise a coordinator snapshot: state, primary and secondary metric, message.

    >>> dashboard_status({"initialized": True, "connected_peers": 2, "total_tasks": 5})["state"]
    'active'
    """
    initialized = bool(snapshot.get("initialized"))
    connected = _count(snapshot, "connected_peers")
    state: DashboardState
    message: str | None
    if not initialized:
        state, message = "disabled", "Not initialized"
    elif connected == 0:
        state, message = "idle", "No peers"
    else:
        state, message = "active", None
    conflicts = _count(snapshot, "identity_conflicts")
    if initialized and conflicts:
        # Loud on purpose: another process proved this peer's key (a copy, or a theft).
        message = (
            f"Another process holds this peer's key ({conflicts} identity conflict(s)); "
            "if it is not yours, run `swarm-notebook identity rotate`"
        )
    last = snapshot.get("last_activity")
    last_timestamp = last.get("timestamp") if isinstance(last, Mapping) else None
    return DashboardStatus(
        state=state,
        primary_metric=f"{connected} peers",
        secondary_metric=f"{_count(snapshot, 'total_tasks')} tasks",
        last_activity=float(last_timestamp) if last_timestamp is not None else None,
        message=message,
        success_rate=success_rate(snapshot),
    )
