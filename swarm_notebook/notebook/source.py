"""Make a ``Coordinator`` the dashboard's ``DashboardSource``.

The coordinator's event bus emits ``stats:changed`` after every change (a ref put,
copied, lost or released included) and
``transfer:sampled`` once a second; the dashboard subscribes to both, so the kernel
never polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from swarm_notebook.views.resident import RESIDENT_MAX_ROWS, resident_data
from swarm_notebook.views.task_stream import (
    STREAM_MAX_BARS,
    recent_tasks,
    task_stream,
    task_summary,
)

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

LOCAL_LANE_NAME = "this peer"
CHANGE_EVENTS = ("stats:changed", "transfer:sampled")


def peer_names(snapshot: Mapping[str, Any]) -> dict[str, str | None]:
    """Card names by peer id from a snapshot's ``peers``; this peer reads as itself.

    >>> peer_names({"local_peer_id": "ME", "peers": [{"id": "P", "name": "bob"}]})
    {'P': 'bob', 'ME': 'this peer'}
    """
    names: dict[str, str | None] = {}
    for peer in snapshot.get("peers") or []:
        if isinstance(peer, Mapping) and peer.get("id"):
            name = peer.get("name")
            names[str(peer["id"])] = str(name) if name else None
    local = snapshot.get("local_peer_id")
    if local:
        names[str(local)] = LOCAL_LANE_NAME
    return names


def with_task_views(
    snapshot: dict[str, Any], records: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    """``snapshot`` plus the task stream, the recent finished tasks and their summary."""
    names = peer_names(snapshot)
    snapshot["task_stream"] = task_stream(records, now=now, names=names)
    snapshot["recent_tasks"] = recent_tasks(records, names=names)
    snapshot["task_summary"] = task_summary(records)
    return snapshot


def with_resident_data(snapshot: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """``snapshot`` plus its "Resident data" section: the newest refs and the store's use."""
    snapshot["resident_data"] = resident_data(
        records,
        snapshot.get("refs"),
        peer_names(snapshot),
        capabilities=snapshot.get("capabilities") or (),
    )
    return snapshot


class CoordinatorSource:
    """``DashboardSource`` view of a coordinator.

    >>> SwarmDashboard(CoordinatorSource(coordinator))  # doctest: +SKIP
    """

    def __init__(self, coordinator: Coordinator, clock: Callable[[], float] = time.time) -> None:
        self._coordinator = coordinator
        self._clock = clock

    def dashboard_snapshot(self) -> dict[str, Any]:
        # After leave() this still reads the last state, marked not initialized (disabled).
        snapshot = self._coordinator.dashboard_snapshot()
        # Bounded read: the stream shows at most this many bars, whatever the log holds.
        records = self._coordinator.task_records(limit=STREAM_MAX_BARS)
        with_resident_data(snapshot, self._coordinator.ref_records(limit=RESIDENT_MAX_ROWS))
        return with_task_views(snapshot, records, self._clock())

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        unsubscribes = [
            self._coordinator.on(event, lambda _payload: callback()) for event in CHANGE_EVENTS
        ]

        def unsubscribe() -> None:
            for undo in unsubscribes:
                undo()

        return unsubscribe

    async def reinitialize(self) -> None:
        await self._coordinator.init()
