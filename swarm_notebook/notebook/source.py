"""Make a ``Coordinator`` the dashboard's ``DashboardSource``.

The coordinator's event bus emits ``stats:changed`` after every change; the dashboard
subscribes to it, so the kernel never polls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator


class CoordinatorSource:
    """``DashboardSource`` view of a coordinator.

    >>> SwarmDashboard(CoordinatorSource(coordinator))  # doctest: +SKIP
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def dashboard_snapshot(self) -> dict[str, Any]:
        # After leave() this still reads the last state, marked not initialized (disabled).
        return self._coordinator.dashboard_snapshot()

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self._coordinator.on("stats:changed", lambda _payload: callback())

    async def reinitialize(self) -> None:
        await self._coordinator.init()
