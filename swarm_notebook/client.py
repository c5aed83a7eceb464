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
import concurrent.futures
import dataclasses
import getpass
import os
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import swarm_notebook.environment as environment
from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.coordinator.config import (
    DEFAULT_ROOM,
    DEFAULT_SIGNALING,
    CoordinatorConfig,
)
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.errors import (
    NotJoinedError,
    RemoteTaskError,
    UsageError,
    WaitTimeout,
    short_id,
)
from swarm_notebook.futures import (
    ItemFuture,
    SubmitOptions,
    SwarmExecutor,
    TaskFuture,
    map_items,
)
from swarm_notebook.futures import gather as gather_results
from swarm_notebook.futures import submit as submit_function
from swarm_notebook.identity import Identity, default_profile_dir
from swarm_notebook.protocol.shared_frame import MIN_SHARED_BYTES
from swarm_notebook.reasons import Reason
from swarm_notebook.sessions import RemoteSession
from swarm_notebook.signaling.url import check_listening, normalize_url
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.ice_config import resolve as resolve_ice
from swarm_notebook.workload.executors.capabilities import PYTHON_EXECUTION
from swarm_notebook.workload.refs import RemoteRef
from swarm_notebook.workload.source import ShippedFunction, SourceCache, ship_function

if TYPE_CHECKING:
    import pandas as pd

    from swarm_notebook.notebook.widget import SwarmDashboard
    from swarm_notebook.views.doctor import Check

T = TypeVar("T")
PYTHON_COMPUTATION_TASK = "python-computation"


class SubmittedTask:
    """A task delegated on the network thread, watchable from any thread.

    What ``Coordinator.submit_task`` returns: ``future`` resolves to the same result dict
    ``delegate_task`` returns (or raises what it raises); ``record()`` is the task's state
    right now. A notebook cell that blocks the kernel's loop can still wait on it.

    >>> task = c.submit_task("python-computation", {"code": "1 + 1"})  # doctest: +SKIP
    >>> task.record()["state"], task.future.result(30)["value"]         # doctest: +SKIP
    ('working', 2)
    """

    def __init__(
        self,
        coordinator: Coordinator,
        task_id: str,
        future: concurrent.futures.Future[dict[str, Any]],
    ) -> None:
        self.coordinator = coordinator
        self.task_id = task_id
        self.future = future

    def record(self) -> dict[str, Any] | None:
        """The task's record (state, peer, attempts...), or None before it is registered."""
        return self.coordinator.task_record(self.task_id)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Stop the task; the coordinator records it as canceled. False if it had ended."""
        return self.future.cancel()


class Coordinator:
    """One peer's handle on the swarm: delegate work, share knowledge, vote on changes."""

    def __init__(self, runner: LoopThread, core: SwarmCoordinator, events: EventBus) -> None:
        self._runner = runner
        self._core = core
        self._events = events
        self._closed = False
        # Run after leaving, newest first (e.g. stop the local swarm local() started).
        self._on_leave: list[Callable[[], Awaitable[None]]] = []
        self._sessions: dict[str, RemoteSession] = {}  # sessions this peer opened
        self._unwatch_peers: Callable[[], None] | None = None
        self._sources = SourceCache()  # functions already shipped by submit/map/sessions

    # -- plumbing ----------------------------------------------------------------------

    def _require_joined(self, coro: Coroutine[Any, Any, Any] | None = None) -> None:
        if self._closed:
            if coro is not None:
                coro.close()
            raise NotJoinedError(
                "this coordinator has left the swarm; join() again", Reason.NOT_JOINED_SWARM
            )

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        self._require_joined(coro)
        return await self._runner.call(coro)

    def _read(self, fn: Callable[[], T]) -> T:
        """Read state on the network loop, from any thread."""
        if self._closed or self._runner.in_thread():
            return fn()

        async def read() -> T:
            return fn()

        return self._runner.run_sync(read(), timeout=10)

    @property
    def peer_id(self) -> str:
        return self._core.local_id

    @property
    def name(self) -> str:
        """The name other peers see on this peer's agent card."""
        return self._core.node.name

    @property
    def signaling(self) -> str:
        """The signaling server's URL, as used (``ws://host:port`` gains ``/ws``)."""
        return self._core.config.signaling

    @property
    def room(self) -> str:
        """The room this coordinator joined."""
        return self._core.config.room

    def peer_name(self, peer_id: str | None) -> str | None:
        """The name a peer gave itself on its signed agent card (display only)."""
        if not peer_id:
            return None
        return self._read(lambda: self._core.peer_name(peer_id))

    def ship(self, fn: Callable[..., Any]) -> ShippedFunction:
        """``fn`` as the source a peer runs (what ``submit`` sends); raises ``UsageError``
        naming what cannot travel (a closure, a notebook global, a lambda)."""
        return ship_function(fn, self._sources)

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
        for session in list(self._sessions.values()):
            # Free the peers' slots now rather than at their idle timeout.
            await asyncio.to_thread(session.close, 10.0)
        if self._unwatch_peers is not None:
            self._unwatch_peers()
        await self._runner.call(self._core.leave())
        self._closed = True
        self._events.close()
        await asyncio.to_thread(self._runner.stop)
        while self._on_leave:
            await self._on_leave.pop()()

    def close_on_leave(self, close: Callable[[], Awaitable[None]]) -> None:
        """Await ``close()`` once this coordinator has left (``local()`` stops its swarm so)."""
        self._on_leave.append(close)

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leave()

    async def settle(self, timeout: float = 10.0) -> list[str]:
        """Wait until every member of the room is connected and told us its capabilities.

        Returns the members still missing after ``timeout`` seconds (empty: all there).
        """
        return await self._call(self._core.settle(timeout))

    async def wait_for_peers(
        self, count: int, *, capability: str | None = None, timeout: float = 30.0
    ) -> int:
        """Wait until ``count`` peers (offering ``capability``, if given) are connected.

        Returns the number of connected peers; raises ``WaitTimeout`` if too few came.

        >>> await c.wait_for_peers(2, capability="python-execution")  # doctest: +SKIP
        2
        """
        missing = await self._call(self._core.settle(timeout, count, capability))
        connected = int(self.get_stats()["connected_peers"])
        if missing:
            what = f" offering {capability}" if capability else ""
            raise WaitTimeout(
                f"{count - len(missing)} of {count} peers{what} connected after {timeout:g} s"
            )
        return connected

    def on(self, event: str, callback: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``callback(payload)`` on this loop when ``event`` happens; returns an unsubscribe.

        Events: ``swarm:reflection-shared``, ``swarm:reflection-integrated``,
        ``swarm:consensus-result``, ``swarm:peer-joined``, ``swarm:peer-left``,
        ``task:submitted|waiting|working|completed|failed|canceled|rejected``
        (``waiting``: no capable peer's card has arrived yet), ``stats:changed``.
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
                core.config.signaling,
                IceSettings(policy=policy),
                servers,
                core.get_stats(),
                ca_file=core.config.ca_file,
            )

        return await self._call(run())

    # -- workload ----------------------------------------------------------------------

    async def delegate_task(
        self,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run a task on the least-loaded capable peer; retries elsewhere if that peer fails.

        One rule for failures:

        * **returns** the result dict for anything a peer ran and reported: ``success``
          True with the value, or False with the user's own error (``error``,
          ``error_type``, ``traceback``), always with ``peer``, ``task_id``, ``attempts``;
        * **raises** a ``DelegationError`` when no peer could run it:
          ``NoCapablePeerError`` (nobody offers what it needs), ``TaskRefused`` (refused
          before running, by a reason every peer would give or by the one ``peer`` named),
          ``AttemptsExhausted`` (every peer tried refused, left or did not answer),
          ``DelegationTimeout`` (no capable peer had room in ``timeout``);
        * **raises** a ``UsageError`` for misuse caught here before any peer is asked:
          ``UnknownTaskTypeError``, ``TaskInputError`` (inputs that cannot be sent),
          ``NotJoinedError``.

        ``requires={"pandas": ">=2.2"}`` admits only peers whose agent cards report
        package versions that meet it (``NoCapablePeerError`` with reason
        ``unmet-requirement`` says what each peer has). A peer whose numpy or pandas
        major.minor differ from ours gets one ``EnvironmentMismatchWarning``, with its name.

        >>> r = await c.delegate_task("python-computation", {"code": "1 + 1"})  # doctest: +SKIP
        >>> r["success"], r["value"]                                           # doctest: +SKIP
        (True, 2)
        """
        result = await self._call(
            self._core.delegate_task(task_type, data, timeout=timeout, peer=peer, requires=requires)
        )
        return self._bind_refs(result)

    def _bind_refs(self, result: dict[str, Any]) -> dict[str, Any]:
        """Refs in a result (kept outputs) fetch and release through this coordinator."""
        for value in [result.get("value"), *(result.get("outputs") or {}).values()]:
            if isinstance(value, RemoteRef):
                value.bind(self)
        return result

    def submit_task(
        self,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        max_attempts: int | None = None,
        requires: Mapping[str, str] | None = None,
        on_output: Callable[[str, str], Any] | None = None,
    ) -> SubmittedTask:
        """Start ``delegate_task`` on the network thread and return at once.

        Usable from synchronous code (a blocking cell, a magic, another thread); the
        future follows ``delegate_task``'s failure rule. ``on_output(stream, text)`` is
        called with what the task prints while it runs (on the loop that called this, if
        one is running; else on the swarm's thread, so keep it short).
        """
        self._require_joined()
        task_id = uuid.uuid4().hex
        core = self._core
        watcher = _on_callers_loop(on_output) if on_output is not None else None

        async def run() -> dict[str, Any]:
            # Watching starts before the task is sent, so no early output is missed.
            unwatch = core.watch_output(task_id, watcher) if watcher is not None else None
            try:
                result = await core.delegate_task(
                    task_type,
                    data,
                    timeout=timeout,
                    peer=peer,
                    task_id=task_id,
                    max_attempts=max_attempts,
                    requires=requires,
                )
                return self._bind_refs(result)
            finally:
                if unwatch is not None:
                    unwatch()

        future = self._runner.submit(run())
        return SubmittedTask(self, task_id, future)

    def task_output(self, task_id: str) -> dict[str, str] | None:
        """What a running (or recent) delegated task printed so far, as it arrived.

        >>> c.task_output(task.task_id)["stdout"]   # doctest: +SKIP
        'epoch 1 loss 0.31\n'
        """
        return self._read(lambda: self._core.task_output(task_id))

    # -- futures (the API ipyparallel and Dask users know) -----------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        peer: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        requires: Mapping[str, str] | None = None,
        on_output: Callable[[str, str], Any] | None = None,
        keep: bool = False,
        keep_replicas: int = 1,
        **kwargs: Any,
    ) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a capable peer; returns a ``TaskFuture`` at once.

        ``fn`` travels as source (never pickle) with the imports it uses; arguments and
        the result travel through the safe codec (DataFrames as Arrow). ``await fut`` or
        ``fut.result()`` gives the value, or raises ``RemoteTaskError`` with the remote
        traceback. ``retries`` bounds how many other peers may take over when a peer dies,
        times out or refuses; the function's own errors are never retried. What it prints
        shows in ``fut.stdout`` / ``fut.stderr`` while it runs, and goes to
        ``on_output(stream, text)`` if given. ``requires={"pandas": ">=2.2"}`` runs it only
        where those versions are installed. Arguments may be ``RemoteRef`` s (from
        ``put``): the task runs where the data is. ``keep=True`` leaves the return value on
        the peer and the future gives a ``RemoteRef`` to it (chain tasks on it);
        ``keep_replicas=2`` has one more capable peer copy it, peer to peer, so it survives
        a holder's death (with 1, the default, it is lost with its peer: ``ref-lost``).

        >>> fut = c.submit(total, df, column="v")   # doctest: +SKIP
        >>> await fut                               # doctest: +SKIP
        42.0
        """
        self._require_joined()
        options = SubmitOptions(peer, timeout, retries, requires, on_output, keep, keep_replicas)
        return submit_function(self, fn, args, kwargs, options)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        peer: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        requires: Mapping[str, str] | None = None,
        progress: bool | None = None,
    ) -> list[ItemFuture]:
        """``fn`` over the items (zipped like ``map``): one future per item, in order.

        Items travel ``chunksize`` to a task (one message per chunk, not per item);
        cancelling an item's future cancels its chunk. ``progress`` shows one bar over
        the items with a count per peer (default: in a notebook, not in scripts).

        >>> c.gather(c.map(square, range(1000), chunksize=100))[:3]   # doctest: +SKIP
        [0, 1, 4]
        """
        self._require_joined()
        options = SubmitOptions(peer, timeout, retries, requires)
        return map_items(self, fn, iterables, options, chunksize, progress)

    def session(
        self,
        name: str,
        peer: str | None = None,
        *,
        idle_timeout: float | None = None,
        timeout: float = 60.0,
        requires: Mapping[str, str] | None = None,
    ) -> RemoteSession:
        """Open (or get back) the session ``name``: a namespace kept on one peer.

        With ``peer`` it opens there, else on the least-loaded capable peer (with
        ``requires={"pandas": ">=2.2"}``, one that has those versions); it stays on
        that peer. ``idle_timeout`` (seconds; the peer's default is 30 minutes, and the
        peer caps it) ends it when unused. Blocks until it is open.

        >>> s = c.session("train")                   # doctest: +SKIP
        >>> s.run("x = 41").result(); s.run("x + 1").result()   # doctest: +SKIP
        42
        """
        self._require_joined()
        existing = self._sessions.get(name)
        if existing is not None and existing.state == "open":
            if peer is None or existing.peer == peer:
                existing.check()
                return existing
            raise UsageError(
                Reason.BAD_ARGUMENTS,
                f"session {name!r} is open on {short_id(existing.peer)}; close it first",
            )
        data: dict[str, Any] = {"code": "", "session": name, "session_op": "open"}
        if idle_timeout is not None:
            data["idle_timeout"] = idle_timeout
        task = self.submit_task(
            PYTHON_COMPUTATION_TASK, data, peer=peer, max_attempts=1, requires=requires
        )
        try:
            reply = task.future.result(timeout)
        except concurrent.futures.TimeoutError:
            task.cancel()
            raise WaitTimeout(f"session {name!r} did not open within {timeout:g} s") from None
        if not reply.get("success"):
            raise RemoteTaskError(
                reply.get("peer"), task.task_id, str(reply.get("error")), None,
                reply.get("error_type"), self.peer_name(reply.get("peer")),
            )  # fmt: skip
        session = RemoteSession(
            self, name, str(reply["peer"]), reply.get("idle_timeout_s"), self._session_ended
        )
        if self._unwatch_peers is None:
            # Reported lost as soon as its peer's link goes, not only when next used.
            self._unwatch_peers = self._events.on("swarm:peer-left", self._peer_left)
        self._sessions[name] = session
        return session

    def _session_ended(self, session: RemoteSession) -> None:
        # A lost session stays listed (with why) until one of its name is opened again.
        if session.state == "closed" and self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    def _peer_left(self, payload: Any) -> None:
        peer = payload.get("peer_id") if isinstance(payload, dict) else None
        for session in list(self._sessions.values()):
            if session.peer == peer and session.state == "open":
                session.lose(f"its peer {self.peer_name(peer) or short_id(peer)} went away")

    def sessions(self) -> list[RemoteSession]:
        """This notebook's sessions: open ones, and lost ones not opened again since."""
        return list(self._sessions.values())

    def peer_connected(self, peer_id: str) -> bool:
        """Whether ``peer_id`` has a live, authenticated link to us right now."""
        return self._read(lambda: peer_id in self._core.node.connected_peers())

    def gather(self, futures: Iterable[Any], timeout: float | None = None) -> list[Any]:
        """The results of ``futures``, in order (blocks; raises the first error)."""
        return gather_results(futures, timeout)

    # -- resident data ----------------------------------------------------------------

    async def put(
        self, value: Any, *, peer: str | None = None, replicas: int = 1, reuse: bool = False
    ) -> RemoteRef:
        """Keep ``value`` on ``replicas`` capable peers (or ``peer``); returns a ``RemoteRef``.

        Pass the ref to ``submit`` or as a ``delegate_task`` input instead of the value:
        the task runs on a holder when one can, so the data crosses the network once. This
        peer keeps its copy and re-pushes it if a holder leaves. A holder without room
        refuses with ``store-full`` (``RefError``); the value stays here. ``reuse=True``
        returns a live ref with the same content instead of putting it again.

        >>> ref = await c.put(df)                                   # doctest: +SKIP
        >>> await c.submit(total, ref, column="v")                 # doctest: +SKIP
        """
        ref = await self._call(self._core.put(value, peer=peer, replicas=replicas, reuse=reuse))
        return ref.bind(self)

    async def fetch(self, ref: RemoteRef | str) -> Any:
        """The value of a ref this peer owns, brought home (``RefError`` if it is gone)."""
        ref_id = ref.ref_id if isinstance(ref, RemoteRef) else str(ref)
        return await self._call(self._core.fetch(ref_id))

    async def release(self, ref: RemoteRef | str) -> None:
        """Free a ref on every holder (``RefError`` if unknown or already released)."""
        ref_id = ref.ref_id if isinstance(ref, RemoteRef) else str(ref)
        await self._call(self._core.release(ref_id))

    def ref_holders(self, ref_id: str) -> tuple[str, ...]:
        """The peers holding a copy of our ref now (empty once released)."""
        return self._read(lambda: self._core.ref_holders(ref_id))

    def ref_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Refs this peer owns and refs it holds for others, as plain dicts; with
        ``limit``, the newest ``limit`` of each."""
        return self._read(lambda: self._core.ref_records(limit))

    def refs_frame(self) -> pd.DataFrame:
        """Refs this peer owns (size, holders, dtypes, state) and refs it holds for others.

        ``holder_names`` and ``owner_name`` are the names on the peers' cards (shortened
        ids where a peer has none), ``holder_ids`` and ``owner`` the full ids.

        >>> c.refs_frame()[["ref_id", "holder_names", "state"]]  # doctest: +SKIP
        """
        from swarm_notebook.views.frames import refs_frame

        return refs_frame(self.ref_records(), peer_names=self._peer_names())

    def executor(
        self,
        *,
        peer: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> SwarmExecutor:
        """A ``concurrent.futures.Executor`` backed by this swarm.

        >>> with c.executor() as pool:                 # doctest: +SKIP
        ...     list(pool.map(square, range(10)))
        """
        self._require_joined()
        return SwarmExecutor(self, SubmitOptions(peer, timeout, retries, requires))

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run a task on this peer, as an incoming request would be run.

        Same failure rule as ``delegate_task``: the result dict if it ran, ``TaskRefused``
        if the executor refused it, ``UnknownTaskTypeError`` for a type nobody knows.
        """
        return await self._call(self._core.execute_task(task))

    # -- knowledge ---------------------------------------------------------------------

    async def share_success_pattern(self, reflection: dict[str, Any]) -> int:
        """Share a successful reflection with every peer; returns how many it reached.

        Only ``outcome == "successful"`` is shared; anything else is stored locally,
        reaches no peer, and says so with a warning.
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

    async def wait_for_reflection(
        self, *, shared_from: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait until a reflection shared by another peer (``shared_from``, if given) is in
        this peer's store; returns its row. Raises ``WaitTimeout`` if none arrives in time.

        >>> await c.wait_for_reflection(shared_from=colleague.peer_id)  # doctest: +SKIP
        """
        row = await self._call(self._core.wait_for_reflection(timeout, shared_from))
        if row is None:
            who = f" from {shared_from[:16]}" if shared_from else ""
            raise WaitTimeout(f"no shared reflection{who} arrived within {timeout:g} s")
        return row

    async def query_knowledge(self, query: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask this peer's store and every connected peer; answers are attributed."""
        return await self._call(self._core.knowledge.query_knowledge(query, timeout=timeout))

    # -- governance --------------------------------------------------------------------

    async def request_modification_consensus(self, modification: dict[str, Any]) -> dict[str, Any]:
        """Ask the peers to vote on a risky change; see ``verify_consensus`` to re-check."""
        return await self._call(self._core.consensus.request_modification_consensus(modification))

    def roster(self) -> dict[str, Any]:
        """The room's electorate: ``{"electorate": "roster"|"open", "owner", "members"...}``."""
        return self._read(self._core.consensus.electorate.describe)

    async def roster_add(self, peer_id: str, name: str = "") -> dict[str, Any]:
        """Put ``peer_id`` on the roster (this peer owns it, or makes it); shared at once."""
        return await self._call(self._core.change_roster("add", peer_id, name))

    async def roster_remove(self, peer_id: str) -> dict[str, Any]:
        """Take ``peer_id`` off the roster this peer owns; shared at once."""
        return await self._call(self._core.change_roster("remove", peer_id))

    def assess_modification_risk(self, modification: dict[str, Any]) -> str:
        return self._core.consensus.assess_modification_risk(modification)

    def set_vote_policy(self, policy: Any) -> None:
        """Decide this peer's ballots with ``policy.decide(proposal, modification)``."""
        bind_names = getattr(policy, "bind_names", None)
        if callable(bind_names):
            bind_names(self.peer_name)  # a voter that shows proposers by their card's name
        self._core.consensus.vote_policy = policy

    # -- views -------------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        return self._read(self._core.get_stats)

    def get_status(self) -> dict[str, Any]:
        """The dashboard's headline: state, primary/secondary metric, last activity."""
        from swarm_notebook.views.status import dashboard_status

        return dict(dashboard_status(self.get_stats()))

    def dashboard_snapshot(self) -> dict[str, Any]:
        return self._read(self._core.dashboard_snapshot)

    def task_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Task records, oldest first; ``limit``: the most recent ones and any running."""
        return self._read(lambda: self._core.task_records(limit))

    def task_record(self, task_id: str) -> dict[str, Any] | None:
        """One task's record (``state``, ``peer``, ``attempts``...), None if unknown."""
        return self._read(lambda: self._core.task_record(task_id))

    def audit_rows(self, operation: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self._read(lambda: self._core.audit.rows(operation, limit=limit))

    # -- notebook views (pandas DataFrames and the dashboard; read-only adapters) ---------

    def peers_frame(self) -> pd.DataFrame:
        """Known peers: id, name, capabilities, state, load, in flight, round-trip time."""
        from swarm_notebook.views.frames import peers_frame

        return peers_frame(self.get_stats())

    def _peer_names(self) -> dict[str, str | None]:
        """Card names by peer id, this peer's own name included (the frames' labels)."""
        names: dict[str, str | None] = {p["id"]: p.get("name") for p in self.get_stats()["peers"]}
        names[self.peer_id] = self.name
        return names

    def tasks_frame(self, role: str | None = "delegated") -> pd.DataFrame:
        """One row per task (``role=None`` adds the tasks this peer served for others).

        ``peer`` is the name on the peer's card, ``peer_id`` its full id.

        >>> c.tasks_frame()[["peer", "state", "duration"]]  # doctest: +SKIP
        """
        from swarm_notebook.views.frames import tasks_frame

        records = self.task_records()
        names = self._peer_names()
        return tasks_frame(
            (r for r in records if role is None or r.get("role") == role), peer_names=names
        )

    def stats_frame(self) -> pd.DataFrame:
        """The counters as a one-row frame, with the success rate."""
        from swarm_notebook.views.frames import stats_frame

        return stats_frame(self.get_stats())

    def consensus_frame(self) -> pd.DataFrame:
        """Consensus decisions: target, risk, outcome, votes for / against / missing."""
        from swarm_notebook.views.frames import consensus_frame

        return consensus_frame(self._read(self._core.consensus.consensus_records))

    def sessions_frame(self) -> pd.DataFrame:
        """The sessions this notebook opened: name, peer, state, runs, idle timeout."""
        from swarm_notebook.views.frames import sessions_frame

        return sessions_frame(s.as_row() for s in self._sessions.values())

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


def _on_callers_loop(callback: Callable[[str, str], Any]) -> Callable[[str, str], None]:
    """``callback`` moved to the loop running now (the kernel's), if there is one."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def forward(stream: str, text: str) -> None:
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(callback, stream, text)
                return
            except RuntimeError:
                pass  # closed meanwhile: deliver here rather than lose it
        callback(stream, text)

    return forward


async def join(
    room: str = DEFAULT_ROOM,
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
    ca_file: str | Path | None = None,
    roster_owner: str | None = None,
    name: str | None = None,
) -> Coordinator:
    """Join ``room`` through the signaling server and initialise the coordinator.

    ``name`` is what other peers see (default: your user name and, in a notebook, the
    notebook's name, e.g. ``alice/analysis``).

    Running other peers' code is off unless ``allow_remote_code=True`` or
    ``"python-execution"`` is listed in ``capabilities``. A ``wss://`` server's certificate
    is verified; ``ca_file`` (or ``$SWARM_NOTEBOOK_CA_FILE``) trusts a self-signed one.
    ``roster_owner`` (default ``$SWARM_NOTEBOOK_ROSTER_OWNER``) is the room owner whose
    signed roster decides who votes; without it, the owner of the roster file in the
    profile, if any.

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
        ca_file,
    )
    if name:
        cfg.name = name
    elif cfg.name == CoordinatorConfig.name:
        cfg.name = default_peer_name(os.environ)
    from_env = os.environ.get(environment.ROSTER_OWNER)
    cfg.roster_owner = roster_owner or cfg.roster_owner or from_env or None
    identity = Identity.load_or_create(profile_dir)
    events = EventBus()
    runner = LoopThread()
    runner.start()

    async def build() -> SwarmCoordinator:
        # Nothing listening is said at once, with how to get a server, not after 10 s.
        await check_listening(cfg.signaling)
        transport = mesh_transport(
            identity, cfg.signaling, room, secret=cfg.secret, config=cfg.mesh, ca_file=cfg.ca_file
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


def default_peer_name(env: Mapping[str, str]) -> str:
    """``user/notebook`` in a Jupyter kernel, else ``user/python``.

    >>> default_peer_name({"USER": "alice", "JPY_SESSION_NAME": "/home/alice/Analysis.ipynb"})
    'alice/Analysis'
    """
    user = env.get("USER") or env.get("LOGNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            user = "user"
    notebook = env.get(environment.JUPYTER_SESSION_NAME)
    return f"{user}/{Path(notebook).stem if notebook else 'python'}"


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
    ca_file: str | Path | None = None,
) -> tuple[CoordinatorConfig, Path]:
    cfg = dataclasses.replace(config) if config is not None else CoordinatorConfig()
    cfg.room, cfg.signaling = room, normalize_url(signaling)
    cfg.secret = secret if secret is not None else cfg.secret
    cfg.ca_file = str(Path(ca_file).expanduser()) if ca_file is not None else cfg.ca_file
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
    reassembly = cfg.mesh.reassembly
    if cfg.executors.python_execution and not cfg.executors.dask:
        if reassembly.shared_min_bytes is None:
            # A sandbox pool hands a large input to its child as the memfd it arrived in.
            cfg.mesh.reassembly = dataclasses.replace(
                reassembly, shared_min_bytes=MIN_SHARED_BYTES
            )
    return cfg, profile_dir
