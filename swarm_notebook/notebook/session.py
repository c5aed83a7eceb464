"""The swarm of one IPython shell: at most one coordinator, shared by magics and code.

A ``SwarmSession`` is stored on the shell object, so ``swarm_notebook.current()``, the
magics and user code share one swarm without module-level state.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from swarm_notebook.errors import NotJoinedError, SignalingError, UsageError
from swarm_notebook.reasons import Reason

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from swarm_notebook.client import Coordinator

T = TypeVar("T")
SESSION_ATTR = "swarm_notebook_session"
LEAVE_TIMEOUT_S = 60.0
NOT_JOINED = (
    "this notebook has not joined a swarm; run `%load_ext swarm_notebook` and "
    "`%swarm join ROOM --signaling URL` first (or `swarm_notebook.use(coordinator)`)"
)


def run_blocking(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running loop.

    A magic runs while the kernel's loop is busy with the cell, so the coroutine gets a
    short-lived loop of its own on a helper thread; the coordinator's work itself happens
    on its network thread either way.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-nb-call") as pool:
        return pool.submit(asyncio.run, coro).result(timeout)


class SwarmSession:
    """The coordinator (at most one) that this shell joined, and what hangs off it."""

    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell
        self.coordinator: Coordinator | None = None
        self.room: str | None = None
        atexit.register(self.close)

    def require(self) -> Coordinator:
        """The joined coordinator, or a clear ``not-joined`` error."""
        if self.coordinator is None or not self.coordinator.is_initialized:
            raise NotJoinedError(NOT_JOINED)
        return self.coordinator

    def use(self, coordinator: Coordinator) -> None:
        """Make a coordinator joined in code the one the magics use."""
        if self.coordinator is not None and self.coordinator is not coordinator:
            if self.coordinator.is_initialized:
                raise UsageError(
                    Reason.ALREADY_JOINED,
                    f"already joined room {self.room!r}; run `%swarm leave` first",
                )
        if not coordinator.is_initialized:
            raise NotJoinedError("that coordinator has left the swarm; join() again")
        self.coordinator = coordinator
        self.room = coordinator.room

    def join(
        self,
        room: str,
        *,
        signaling: str,
        secret: str | None,
        capabilities: list[str] | None,
        profile: Path | None,
        settle_s: float,
        ice_servers: list[dict[str, Any]] | None = None,
        ice_policy: str | None = None,
        name: str | None = None,
    ) -> tuple[Coordinator, list[str]]:
        """Join ``room``; wait up to ``settle_s`` for the room's peers to connect.

        Returns the coordinator and the room members that did not connect in time.
        """
        if self.coordinator is not None and self.coordinator.is_initialized:
            raise UsageError(
                Reason.ALREADY_JOINED,
                f"already joined room {self.room!r}; run `%swarm leave` first",
            )
        from swarm_notebook.client import join

        try:
            coordinator = run_blocking(
                join(
                    room,
                    signaling=signaling,
                    secret=secret,
                    capabilities=capabilities,
                    profile=profile,
                    ice_servers=ice_servers,
                    ice_policy=ice_policy,
                    name=name,
                )
            )
        except SignalingError as exc:
            # Same class and reason; the message says which room and server.
            raise type(exc)(
                exc.reason, f"cannot join room {room!r} via {signaling}: {exc.message}"
            ) from None
        except OSError as exc:
            raise UsageError(
                Reason.SIGNALING_UNREACHABLE,
                f"cannot reach the signaling server {signaling}: {exc}",
            ) from None
        self.coordinator, self.room = coordinator, room
        missing = run_blocking(coordinator.settle(settle_s), timeout=settle_s + 10)
        return coordinator, missing

    def local(self, workers: int, *, name: str | None = None) -> Coordinator:
        """Start a local swarm (server and ``workers`` workers) from this kernel and join it."""
        if self.coordinator is not None and self.coordinator.is_initialized:
            raise UsageError(
                Reason.ALREADY_JOINED,
                f"already joined room {self.room!r}; run `%swarm leave` first",
            )
        from swarm_notebook.launcher import local

        coordinator = run_blocking(local(workers, name=name))
        self.coordinator, self.room = coordinator, coordinator.room
        return coordinator

    def leave(self, timeout: float = LEAVE_TIMEOUT_S) -> bool:
        """Leave the swarm; False if there was nothing to leave."""
        coordinator, self.coordinator = self.coordinator, None
        if coordinator is None or not coordinator.is_initialized:
            return False
        run_blocking(coordinator.leave(), timeout)
        return True

    def close(self) -> None:
        """Leave on interpreter exit or when the extension is unloaded."""
        atexit.unregister(self.close)
        try:
            self.leave()
        except Exception:  # at exit there is nobody left to tell
            pass


def session_of(shell: Any) -> SwarmSession | None:
    session = getattr(shell, SESSION_ATTR, None)
    return session if isinstance(session, SwarmSession) else None
