"""The public API: ``join()`` a room and get a ``Coordinator``.

Every coroutine here is awaitable from the caller's loop (top-level ``await`` in a
notebook). The swarm itself runs on its own thread and loop, so heartbeats and peers'
requests are served even while a cell blocks the kernel with synchronous work.

>>> coordinator = await swarm_notebook.join("lab")                       # doctest: +SKIP
>>> result = await coordinator.delegate_task(
...     "python-computation", {"code": "df.describe()", "inputs": {"df": df}})  # doctest: +SKIP
>>> result["value"]                                                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.coordinator.config import DEFAULT_SIGNALING, CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.identity import Identity, default_profile_dir
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.ice_config import resolve as resolve_ice
from swarm_notebook.workload.executors.capabilities import PYTHON_EXECUTION

if TYPE_CHECKING:
    import pandas as pd

    from swarm_notebook.notebook.widget import SwarmDashboard
    from swarm_notebook.views.doctor import Check

T = TypeVar("T")


class Coordinator:
    """One peer's handle on the swarm (the blueprint's WebRTCCoordinator API)."""

    def __init__(self, runner: LoopThread, core: SwarmCoordinator, events: EventBus) -> None:
        self._runner = runner
        self._core = core
        self._events = events
        self._closed = False

    # -- plumbing ----------------------------------------------------------------------

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("this coordinator has left the swarm; join() again")
        return await self._runner.call(coro)

    def _read(self, fn: Callable[[], T]) -> T:
        """Read state on the network loop, from any thread."""
        if self._closed or self._runner.in_thread():
            return fn()

        async def read() -> T:
            return fn()

        return self._runner.run_sync(read(), timeout=10)

    @property
    def core(self) -> SwarmCoordinator:
        """The coordinator on the network loop (for advanced use and tests)."""
        return self._core

    @property
    def peer_id(self) -> str:
        return self._core.local_id

    @property
    def is_initialized(self) -> bool:
        return self._core.initialized and not self._closed

    # -- lifecycle ---------------------------------------------------------------------

    async def init(self) -> list[str]:
        """(Re)detect capabilities and re-advertise them; returns the capabilities."""
        return await self._call(self._core.init())

    reinitialize = init

    async def leave(self) -> None:
        """Finish or hand back running tasks, close every link, stop the network thread."""
        if self._closed:
            return
        await self._runner.call(self._core.leave())
        self._closed = True
        self._events.close()
        await asyncio.to_thread(self._runner.stop)

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leave()

    def on(self, event: str, callback: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``callback(payload)`` on this loop when ``event`` happens; returns an unsubscribe.

        Events: ``swarm:reflection-shared``, ``swarm:reflection-integrated``,
        ``swarm:consensus-result``, ``swarm:peer-joined``, ``swarm:peer-left``,
        ``task:submitted|working|completed|failed|canceled|rejected``, ``stats:changed``.
        """
        return self._events.on(event, callback)

    async def doctor(self) -> list[Check]:
        """Signaling, the ICE servers in use, the NAT type and every link, with advice.

        >>> print(render(await c.doctor()))  # doctest: +SKIP
        """
        from swarm_notebook.transport.ice_config import IceSettings, parse_policy
        from swarm_notebook.views.doctor import diagnose_swarm

        core = self._core
        transport = core.node.transport
        servers = getattr(transport, "ice_servers", ())
        policy = parse_policy(core.config.mesh.ice_policy or "all")

        async def run() -> list[Check]:
            return await diagnose_swarm(
                core.config.signaling, IceSettings(policy=policy), servers, core.get_stats()
            )

        return await self._call(run())

    # -- workload ----------------------------------------------------------------------

    async def delegate_task(
        self, task_type: str, data: Any, *, timeout: float | None = None, peer: str | None = None
    ) -> dict[str, Any]:
        """Run a task on the least-loaded capable peer; retries elsewhere if that peer fails.

        >>> r = await c.delegate_task("python-computation", {"code": "1 + 1"})  # doctest: +SKIP
        >>> r["success"], r["value"]                                           # doctest: +SKIP
        (True, 2)
        """
        return await self._call(
            self._core.delegate_task(task_type, data, timeout=timeout, peer=peer)
        )

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run a task on this peer, as an incoming request would be run."""
        return await self._call(self._core.execute_task(task))

    # -- knowledge ---------------------------------------------------------------------

    async def share_success_pattern(self, reflection: dict[str, Any]) -> int:
        """Share a successful reflection with every peer; returns how many it reached.

        As in the blueprint only ``outcome == "successful"`` is shared; anything else is
        stored locally, reaches no peer, and says so with a warning.
        """
        outcome = reflection.get("outcome") if isinstance(reflection, dict) else None
        if outcome != "successful":
            warnings.warn(
                f"only reflections with outcome 'successful' are shared (got {outcome!r}); "
                "it was stored locally and reached no peer",
                UserWarning,
                stacklevel=2,
            )
        return await self._call(self._core.knowledge.share_success_pattern(reflection))

    async def integrate_shared_reflection(self, peer_id: str, reflection: Any) -> dict[str, Any]:
        return await self._call(
            self._core.knowledge.integrate_shared_reflection(peer_id, reflection)
        )

    async def add_reflection(self, reflection: dict[str, Any]) -> dict[str, Any]:
        """Store a reflection locally (signed by this peer) without sharing it."""
        return await self._call(self._core.knowledge.add_reflection(reflection))

    async def query_knowledge(self, query: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask this peer's store and every connected peer; answers are attributed."""
        return await self._call(self._core.knowledge.query_knowledge(query, timeout=timeout))

    # -- governance --------------------------------------------------------------------

    async def request_modification_consensus(self, modification: dict[str, Any]) -> dict[str, Any]:
        """Ask the peers to vote on a risky change; see ``verify_consensus`` to re-check."""
        return await self._call(self._core.consensus.request_modification_consensus(modification))

    def assess_modification_risk(self, modification: dict[str, Any]) -> str:
        return self._core.consensus.assess_modification_risk(modification)

    def set_vote_policy(self, policy: Any) -> None:
        """Decide this peer's ballots with ``policy.decide(proposal, modification)``."""
        self._core.consensus.vote_policy = policy

    # -- views -------------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        return self._read(self._core.get_stats)

    def get_status(self) -> dict[str, Any]:
        """The blueprint's ``getStatus()``: state, primary/secondary metric, last activity."""
        from swarm_notebook.views.status import dashboard_status

        return dict(dashboard_status(self.get_stats()))

    def dashboard_snapshot(self) -> dict[str, Any]:
        return self._read(self._core.dashboard_snapshot)

    def task_records(self) -> list[dict[str, Any]]:
        return self._read(self._core.task_records)

    def audit_rows(self, operation: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._read(lambda: self._core.audit.rows(operation, limit=limit))

    # -- notebook views (pandas DataFrames and the dashboard; read-only adapters) ---------

    def peers_frame(self) -> pd.DataFrame:
        """Known peers: id, name, capabilities, state, load, in flight, round-trip time."""
        from swarm_notebook.views.frames import peers_frame

        return peers_frame(self.get_stats())

    def tasks_frame(self, role: str | None = "delegated") -> pd.DataFrame:
        """One row per task (``role=None`` adds the tasks this peer served for others).

        >>> c.tasks_frame()[["peer", "state", "duration"]]  # doctest: +SKIP
        """
        from swarm_notebook.views.frames import tasks_frame

        records = self.task_records()
        return tasks_frame(r for r in records if role is None or r.get("role") == role)

    def stats_frame(self) -> pd.DataFrame:
        """The counters as a one-row frame, with the success rate."""
        from swarm_notebook.views.frames import stats_frame

        return stats_frame(self.get_stats())

    def consensus_frame(self) -> pd.DataFrame:
        """Consensus decisions: target, risk, outcome, votes for / against / missing."""
        from swarm_notebook.views.frames import consensus_frame

        return consensus_frame(self._read(self._core.consensus.consensus_records))

    def reflections_frame(self) -> pd.DataFrame:
        """Reflections in this peer's store, local and shared (``shared_from``)."""
        from swarm_notebook.views.frames import reflections_frame

        return reflections_frame(self._read(self._core.knowledge.reflection_records))

    def dashboard(self) -> SwarmDashboard:
        """The live swarm panel; call it in a notebook cell to show it.

        >>> c.dashboard()  # doctest: +SKIP
        """
        from swarm_notebook.notebook.source import CoordinatorSource
        from swarm_notebook.notebook.widget import SwarmDashboard

        return SwarmDashboard(CoordinatorSource(self))


async def join(
    room: str = "default",
    *,
    signaling: str = DEFAULT_SIGNALING,
    capabilities: list[str] | None = None,
    secret: str | None = None,
    profile: str | Path | None = None,
    allow_remote_code: bool = False,
    workspace: str | Path | None = None,
    git_repo: str | Path | None = None,
    llm_endpoint: str | None = None,
    ice_servers: list[dict[str, Any]] | None = None,
    ice_policy: str | None = None,
    config: CoordinatorConfig | None = None,
) -> Coordinator:
    """Join ``room`` through the signaling server and initialise the coordinator.

    Running other peers' code is off unless ``allow_remote_code=True`` or
    ``"python-execution"`` is listed in ``capabilities``.

    ICE: ``ice_servers=[{"urls": "turn:host:3478", "username": ..., "credential": ...}]``
    and ``ice_policy="relay"`` win over ``$SWARM_NOTEBOOK_ICE_SERVERS`` /
    ``$SWARM_NOTEBOOK_ICE_POLICY``, which win over ``<profile>/ice.json``, which wins over
    the servers the signaling server issues. A setting that cannot be used raises
    ``IceConfigError`` here.

    >>> c = await swarm_notebook.join("lab", signaling="ws://127.0.0.1:8765/ws")  # doctest: +SKIP
    """
    cfg, profile_dir = _resolve_config(
        room,
        signaling,
        capabilities,
        secret,
        profile,
        allow_remote_code,
        workspace,
        git_repo,
        llm_endpoint,
        ice_servers,
        ice_policy,
        config,
    )
    identity = Identity.load_or_create(profile_dir)
    events = EventBus()
    runner = LoopThread()
    runner.start()

    async def build() -> SwarmCoordinator:
        transport = mesh_transport(
            identity, cfg.signaling, room, secret=cfg.secret, config=cfg.mesh
        )
        core = SwarmCoordinator(identity, transport, cfg, profile_dir, events)
        try:
            await core.start()
        except BaseException:
            await core.leave()
            raise
        return core

    try:
        core = await runner.call(build())
    except BaseException:
        await asyncio.to_thread(runner.stop)
        raise
    return Coordinator(runner, core, events)


def _resolve_config(
    room: str,
    signaling: str,
    capabilities: list[str] | None,
    secret: str | None,
    profile: str | Path | None,
    allow_remote_code: bool,
    workspace: str | Path | None,
    git_repo: str | Path | None,
    llm_endpoint: str | None,
    ice_servers: list[dict[str, Any]] | None,
    ice_policy: str | None,
    config: CoordinatorConfig | None,
) -> tuple[CoordinatorConfig, Path]:
    cfg = dataclasses.replace(config) if config is not None else CoordinatorConfig()
    cfg.room, cfg.signaling = room, signaling
    cfg.secret = secret if secret is not None else cfg.secret
    if capabilities is not None:
        cfg.capabilities = list(capabilities)
    python_execution = allow_remote_code or PYTHON_EXECUTION in (capabilities or [])
    cfg.executors = dataclasses.replace(
        cfg.executors,
        python_execution=cfg.executors.python_execution or python_execution,
        workspace=Path(workspace).expanduser() if workspace else cfg.executors.workspace,
        git_repo=Path(git_repo).expanduser() if git_repo else cfg.executors.git_repo,
        llm_endpoint=llm_endpoint or cfg.executors.llm_endpoint,
    )
    profile_dir = Path(profile).expanduser() if profile else (cfg.profile or default_profile_dir())
    ice = resolve_ice(
        ice_servers if ice_servers is not None else cfg.mesh.ice_servers,
        ice_policy if ice_policy is not None else cfg.mesh.ice_policy,
        profile_dir=profile_dir,
    )
    cfg.mesh = dataclasses.replace(
        cfg.mesh,
        ice_servers=ice.as_dicts() if ice.configured else None,
        ice_policy=ice.policy,
    )
    return cfg, profile_dir
