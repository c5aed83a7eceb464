"""``%load_ext swarm_notebook``: the swarm of one IPython shell.

The coordinator that ``%swarm join`` creates belongs to a ``SwarmSession`` stored on the
shell object, so ``swarm_notebook.current()``, the magics and user code share one swarm
without module-level state.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from swarm_notebook.notebook.handle import SwarmUsageError

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from swarm_notebook.client import Coordinator

T = TypeVar("T")
SESSION_ATTR = "swarm_notebook_session"
LEAVE_TIMEOUT_S = 60.0
NOT_JOINED = (
    "this notebook has not joined a swarm; run `%load_ext swarm_notebook` and "
    "`%swarm join ROOM --signaling URL` first"
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
            raise SwarmUsageError("not-joined", NOT_JOINED)
        return self.coordinator

    def use(self, coordinator: Coordinator, room: str | None = None) -> None:
        """Make a coordinator joined in code the one the magics use."""
        if self.coordinator is not None and self.coordinator is not coordinator:
            if self.coordinator.is_initialized:
                raise SwarmUsageError(
                    "already-joined",
                    f"already joined room {self.room!r}; run `%swarm leave` first",
                )
        self.coordinator = coordinator
        self.room = room or coordinator.core.config.room

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
    ) -> tuple[Coordinator, list[str]]:
        """Join ``room``; wait up to ``settle_s`` for the room's peers to connect.

        Returns the coordinator and the room members that did not connect in time.
        """
        if self.coordinator is not None and self.coordinator.is_initialized:
            raise SwarmUsageError(
                "already-joined", f"already joined room {self.room!r}; run `%swarm leave` first"
            )
        from swarm_notebook.client import join
        from swarm_notebook.errors import SignalingError

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
                )
            )
        except SignalingError as exc:
            raise SwarmUsageError(
                f"signaling-{exc.reason}",
                f"cannot join room {room!r} via {signaling}: {exc.message}",
            ) from None
        except OSError as exc:
            raise SwarmUsageError(
                "signaling-unreachable", f"cannot reach the signaling server {signaling}: {exc}"
            ) from None
        self.coordinator, self.room = coordinator, room
        missing = coordinator._runner.run_sync(settle(coordinator, settle_s), timeout=settle_s + 10)
        return coordinator, missing

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


async def settle(coordinator: Coordinator, timeout: float, count: int | None = None) -> list[str]:
    """On the network loop: wait until the room's members (or ``count`` peers) are connected
    and advertised their capabilities; returns the members still missing at ``timeout``."""
    core = coordinator.core
    changed = asyncio.Event()

    def ready(peer_id: str) -> bool:
        view = core.node.peer(peer_id)
        return view is not None and view.state == "connected" and view.card is not None

    def pending() -> list[str]:
        missing = [m for m in core.node.transport.room_members() if not ready(m)]
        if count is not None:
            have = sum(1 for v in core.node.peers() if ready(v.peer_id))
            # Members we have not even heard of yet count as missing too.
            return (missing or ["(not yet in the room)"]) if have < count else []
        return missing

    unsubscribe = core.events.on("stats:changed", lambda _payload: changed.set())
    try:
        async with asyncio.timeout(timeout):
            while pending():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        pass
    finally:
        unsubscribe()
    return pending()


async def wait_for_peers(coordinator: Coordinator, count: int, timeout: float = 30.0) -> int:
    """Wait until ``count`` peers are connected and told us their capabilities.

    Returns the number connected; raises ``TimeoutError`` if fewer made it in time.

    >>> await wait_for_peers(colleague, 3)  # doctest: +SKIP
    3
    """
    missing = await coordinator._runner.call(settle(coordinator, timeout, count))
    connected = int(coordinator.get_stats()["connected_peers"])
    if missing:
        raise TimeoutError(f"{connected} of {count} peers connected after {timeout:g} s")
    return connected


def session_of(shell: Any) -> SwarmSession | None:
    session = getattr(shell, SESSION_ATTR, None)
    return session if isinstance(session, SwarmSession) else None


def current() -> Coordinator:
    """The coordinator ``%swarm join`` created in this IPython session.

    >>> c = swarm_notebook.current()   # doctest: +SKIP
    >>> c.peers_frame()                # doctest: +SKIP
    """
    from IPython import get_ipython

    session = session_of(get_ipython())
    if session is None:
        raise SwarmUsageError("not-joined", NOT_JOINED)
    return session.require()


def use(coordinator: Coordinator) -> None:
    """Let the magics use a coordinator joined in code (``await swarm_notebook.join(...)``)."""
    from IPython import get_ipython

    shell = get_ipython()
    session = session_of(shell)
    if session is None:
        raise SwarmUsageError("not-loaded", "run `%load_ext swarm_notebook` first")
    session.use(coordinator)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register ``%swarm`` / ``%%swarm`` (``%load_ext swarm_notebook``)."""
    from swarm_notebook.notebook.magics import SwarmMagics

    session = session_of(ipython)
    if session is None:
        session = SwarmSession(ipython)
        setattr(ipython, SESSION_ATTR, session)
    ipython.register_magics(SwarmMagics(ipython, session))


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Leave the swarm and forget the session (``%unload_ext swarm_notebook``)."""
    session = session_of(ipython)
    if session is not None:
        session.close()
        delattr(ipython, SESSION_ATTR)
    magics = ipython.magics_manager.magics
    magics["line"].pop("swarm", None)
    magics["cell"].pop("swarm", None)
