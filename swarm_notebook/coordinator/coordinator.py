"""The blueprint's WebRTCCoordinator: workload, knowledge and governance on one swarm node.

``SwarmCoordinator`` lives on the network loop. Notebook code talks to it through
``swarm_notebook.client.Coordinator``, which bridges from the kernel's loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook._util.version import __version__
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.errors import (
    EnvironmentMismatchWarning,
    NotJoinedError,
    RefError,
    RemoteError,
    RosterError,
    SwarmError,
    TaskInputError,
    ValueCodecError,
)
from swarm_notebook.governance.electorate import Electorate
from swarm_notebook.governance.service import ConsensusService
from swarm_notebook.identity import Identity, require_canonical
from swarm_notebook.knowledge.service import KnowledgeService
from swarm_notebook.knowledge.store import ReflectionStore
from swarm_notebook.ledger.audit import AuditLog
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.ledger.transfer import SAMPLE_INTERVAL_S, TransferHistory, byte_totals
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.membership.roster import with_member, without_member
from swarm_notebook.membership.versions import (
    environment_report,
    major_minor_differences,
    parse_requires,
)
from swarm_notebook.protocol.compression import Compression
from swarm_notebook.protocol.describe import describe_value, shape_of
from swarm_notebook.protocol.values import DecodeBudget, decode_value, encode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.base import Transport
from swarm_notebook.workload.delegator import Delegator, WireData
from swarm_notebook.workload.executors.base import Executor
from swarm_notebook.workload.executors.capabilities import (
    PYTHON_EXECUTION,
    build_executors,
    close_executors,
    detect_capabilities,
)
from swarm_notebook.workload.executors.dask_task import DaskTaskExecutor
from swarm_notebook.workload.messages import REF_GET, requirements_for_task_type
from swarm_notebook.workload.records import TaskLog
from swarm_notebook.workload.ref_service import RefService
from swarm_notebook.workload.refs import KEPT_RESULT, RefOwner, RefState, RemoteRef
from swarm_notebook.workload.store import RefStore, content_digest
from swarm_notebook.workload.task_server import TaskServer

log = logging.getLogger(__name__)
AUDIT_FLUSH_INTERVAL_S = 0.25
MAX_CARD_CONCURRENCY = 1024  # what verify_card accepts


class SwarmCoordinator:
    """Coordinates one peer's part in the swarm. All methods run on the network loop."""

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        config: CoordinatorConfig,
        profile_dir: Path,
        events: EventBus,
    ) -> None:
        self.identity = identity
        self.config = config
        self.profile_dir = profile_dir
        self.events = events
        self.node = SwarmNode(identity, transport, name=config.name, version=__version__)
        # Results refused while decoding, by reason; logged once per (peer, reason).
        self.decode_refusals: Counter[str] = Counter()
        self._decode_logged: set[tuple[str | None, str]] = set()
        self.stats = CoordinationStats()
        self.tasks = TaskLog()
        self.transfer = TransferHistory()
        self.audit = AuditLog(profile_dir / "audit.sqlite3")
        self.reflections = ReflectionStore(profile_dir / "reflections.sqlite3")
        self.initialized = False
        self.init_count = 0
        self.executors: dict[str, Executor] = {}
        self.environment: dict[str, str] = {}
        self._environment_warned: set[str] = set()  # peers already warned about, once each
        self.delegator = Delegator(
            self.node,
            self.tasks,
            self.stats,
            self._notify,
            config.delegation,
            local_runner=self._run_locally,
        )
        self.ref_store = RefStore(
            config.store_bytes,
            spill_dir=config.store_spill_dir,
            max_spill_bytes=config.store_spill_bytes,
        )
        self.ref_service = RefService(self.node, self.ref_store, self._notify)
        self.refs = RefOwner(self.node, self._notify)
        self.task_server = TaskServer(
            self.node,
            self.executors,
            config.policy,
            self.tasks,
            self.stats,
            self._notify,
            concurrency=config.concurrency,
            max_queue=config.max_queue,
            audit=self.audit.record_quietly,
            codec=config.compression,
            refs=self.ref_service,
        )
        self.knowledge = KnowledgeService(
            node=self.node,
            store=self.reflections,
            audit=self.audit,
            stats=self.stats,
            notify=self._notify,
            settings=config.knowledge,
            workspace=config.executors.workspace,
            is_initialized=lambda: self.initialized,
        )
        self.consensus = ConsensusService(
            node=self.node,
            audit=self.audit,
            stats=self.stats,
            notify=self._notify,
            settings=config.consensus,
            is_initialized=lambda: self.initialized,
            electorate=Electorate(
                identity, config.room, profile_dir=profile_dir, trusted_owner=config.roster_owner
            ),
        )
        self._background = OwnedTasks("coordinator")
        self._capabilities: list[str] = []
        self._watched_backends: set[int] = set()
        self.node.add_listener(self._peer_changed)

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.node.start()
        self._background.spawn(self._flush_audit_periodically(), name="audit-flush")
        self._background.spawn(self._sample_transfer_periodically(), name="transfer-sampler")
        await self.init()

    async def _flush_audit_periodically(self) -> None:
        # Batched audit rows reach the file within a fraction of a second even when
        # activity stops (reads and leave() flush at once anyway).
        while True:
            await asyncio.sleep(AUDIT_FLUSH_INTERVAL_S)
            self.audit.flush()

    async def _sample_transfer_periodically(self) -> None:
        # Sampled here, on the network loop, so the history has no holes while a cell
        # blocks the kernel; the dashboard reads it whenever it next draws.
        while True:
            self.transfer.record(time.time(), *byte_totals(self.node.transport.stats()))
            self.events.emit("transfer:sampled", None)
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def init(self) -> list[str]:
        """Detect capabilities, (re)build executors and advertise a fresh agent card.

        Safe to call again (the blueprint's Reinitialize): message handlers are registered
        once, in the constructors, and never duplicated.
        """
        detected = await detect_capabilities(self.config.executors)
        wanted = self.config.capabilities
        if wanted is not None:
            capabilities = [c for c in detected if c in wanted]
        else:
            capabilities = [
                c
                for c in detected
                if c != PYTHON_EXECUTION or self.config.executors.python_execution
            ]
        old = dict(self.executors)
        fresh = build_executors(
            self.config.executors, capabilities, allowed=self._may_run_unisolated
        )
        # Keep executors that are still wanted (a warm sandbox pool is worth keeping).
        for task_type, executor in old.items():
            if task_type in fresh:
                await fresh[task_type].close()
                fresh[task_type] = executor
        for task_type, executor in old.items():
            if task_type not in fresh:
                await executor.close()
        self.executors.clear()
        self.executors.update(fresh)
        for executor in self.executors.values():
            start = getattr(executor, "start", None)
            if start is not None:
                await start()
        self.environment = environment_report(self.config.report_packages)
        self._capabilities = capabilities
        self._advertise()
        self._watch_backend()
        self.initialized = True
        self.init_count += 1
        self.stats.touch("init")
        self._notify("stats:changed", {})
        return capabilities

    def _advertise(self) -> None:
        limits = {
            "max_input_bytes": self.config.policy.max_input_bytes,
            "max_queue": self.config.max_queue,
        }
        concurrency = self.concurrency
        self.node.advertise(
            self._capabilities,
            concurrency,
            limits,
            self.isolation or "",
            environment=self.environment,
            backend=self.backend or "",
        )
        if concurrency != self.task_server.concurrency:
            self.task_server.set_concurrency(concurrency)

    @property
    def concurrency(self) -> int:
        """Tasks this peer runs at once: a Dask cluster's threads, else the configured."""
        dask = self._dask()
        if dask is not None:
            return min(dask.capacity, MAX_CARD_CONCURRENCY)
        return self.config.concurrency

    def _dask(self) -> DaskTaskExecutor | None:
        executor = self.executors.get("python-computation")
        return executor if isinstance(executor, DaskTaskExecutor) else None

    def _watch_backend(self) -> None:
        """Follow a Dask cluster's size (re-sign the card) and occupancy (report load)."""
        dask = self._dask()
        self.task_server.occupancy = dask.occupancy if dask is not None else None
        if dask is None or id(dask) in self._watched_backends:
            return
        self._watched_backends.add(id(dask))

        def changed() -> None:
            if self._dask() is not dask:
                return
            if self.node.card is not None and self.node.card.concurrency != self.concurrency:
                self._advertise()
                self._notify("stats:changed", {})
            else:
                self.task_server.refresh_load()

        dask.cluster.on_change(changed)

    def _may_run_unisolated(self, peer_id: str) -> bool:
        """Whom a Dask-backed peer serves: itself, ``--allow`` peers, the roster's members."""
        return (
            peer_id == self.local_id
            or peer_id in self.config.executors.dask_allow
            or self.consensus.electorate.is_member(peer_id)
        )

    async def leave(self) -> None:
        # Our refs first, while the links are up: holders free them at once (they would
        # when our link drops anyway, but later).
        await self.refs.release_all()
        handed_back = await self.task_server.drain(self.config.drain_grace_s)
        if handed_back:
            log.warning("%d task(s) handed back to their delegators on shutdown", handed_back)
        self.initialized = False
        await self._background.close()
        await self.knowledge.close()
        await self.consensus.close()
        await self.task_server.close()
        await self.refs.close()
        self.ref_store.close()
        # init() builds the executors, so this is the one place that closes them.
        await close_executors(self.executors)
        await self.node.close()
        self.reflections.close()
        self.audit.close()
        self._notify("stats:changed", {})

    # -- events ------------------------------------------------------------------------

    def _notify(self, event: str, payload: dict[str, Any]) -> None:
        self.events.emit(event, payload)
        if event != "stats:changed":
            self.events.emit("stats:changed", {"cause": event})

    def _peer_changed(self, peer_id: str, what: str) -> None:
        if what == "up":
            self._notify("swarm:peer-joined", {"peer_id": peer_id})
        elif what == "down":
            self._notify("swarm:peer-left", {"peer_id": peer_id})
        else:
            self.events.emit("stats:changed", {"cause": what})

    # -- workload ----------------------------------------------------------------------

    async def delegate_task(
        self,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        task_id: str | None = None,
        max_attempts: int | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Delegate one task; the failure rule is ``client.Coordinator.delegate_task``'s."""
        if not self.initialized:
            raise NotJoinedError(
                "the coordinator is not initialised; call init()", Reason.NOT_INITIALIZED
            )
        requirements_for_task_type(task_type)
        if timeout is not None and not timeout > 0:
            raise TaskInputError(Reason.BAD_ARGUMENTS, f"timeout must be > 0 s, got {timeout!r}")
        specs = parse_requires(requires)
        data, keep_replicas, function = self._kept_options(data)
        wire_data = self._encode_inputs(task_type, data)
        prefer, prepare = self._ref_placement(wire_data)

        def encode_again() -> Any:
            again = self._encode_inputs(task_type, data)
            self._ref_placement(again)  # takes the ref handles out, as for the first
            return again

        wire = WireData(wire_data, encode_again)
        del wire_data  # the first attempt takes it (see ``WireData``)
        started = time.monotonic()
        record, result = await self.delegator.delegate(
            task_type,
            wire,
            timeout=timeout,
            peer=peer,
            task_id=task_id,
            max_attempts=max_attempts,
            requires=specs,
            prefer=prefer,
            prepare=prepare,
        )
        self.audit.record_quietly(
            "delegation-sent",
            peer=record.peer,
            outcome=record.state,
            detail={
                "task_id": record.id,
                "type": task_type,
                "attempts": record.attempts,
                "error": record.error,
            },
        )
        attempts = result.get("backend_attempts")
        if isinstance(attempts, int) and not isinstance(attempts, bool):
            record.backend_attempts = attempts
        result = self._decode_outputs(task_type, result, record.peer)
        await self._adopt_kept(result, record.peer, keep_replicas, record.id, function)
        warning = self._environment_warning(record.peer)
        if warning is not None:
            result["environment_warning"] = warning
        result.update(
            task_id=record.id,
            peer=record.peer,
            attempts=record.attempts,
            state=record.state,
            duration_s=time.monotonic() - started,
        )
        return result

    def _environment_warning(self, peer: str | None) -> str | None:
        """Once per peer: numpy / pandas major.minor differ between it and us."""
        if peer is None or peer in self._environment_warned:
            return None
        view = self.node.peer(peer)
        if view is None or view.card is None:
            return None
        differences = major_minor_differences(self.environment, view.card.environment)
        self._environment_warned.add(peer)
        if not differences:
            return None
        text = (
            f"peer {view.card.name} ({peer[:16]}) runs other versions: "
            + "; ".join(differences)
            + ". Results may differ from running here; pick peers with requires="
            '{"pandas": "==X.Y.*"} if that matters.'
        )
        log.warning("%s", text)
        warnings.warn(EnvironmentMismatchWarning(Reason.VERSION_MISMATCH, text), stacklevel=1)
        return text

    @staticmethod
    def _kept_options(data: Any) -> tuple[Any, int, str | None]:
        """``data`` without the options that stay here: how many holders kept outputs get
        (``keep_replicas``) and the submitted function's name (for a lost ref's message)."""
        if not isinstance(data, dict) or not ({"keep_replicas", "_function"} & data.keys()):
            return data, 1, None
        data = dict(data)
        replicas = data.pop("keep_replicas", 1)
        function = data.pop("_function", None)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise TaskInputError(
                Reason.BAD_ARGUMENTS, f"keep_replicas must be an int >= 1, got {replicas!r}"
            )
        if replicas > 1 and not data.get("keep"):
            raise TaskInputError(
                Reason.BAD_ARGUMENTS, "keep_replicas needs outputs to keep (keep=[...])"
            )
        return data, replicas, function if isinstance(function, str) else None

    def _encode_inputs(self, task_type: str, data: Any) -> Any:
        if task_type != "python-computation" or not isinstance(data, dict):
            return data
        wire = dict(data)
        inputs = data.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise TaskInputError(
                Reason.BAD_INPUT, "python-computation 'inputs' must be a dict of name -> value"
            )
        refs = {name: v for name, v in inputs.items() if isinstance(v, RemoteRef)}
        if refs:
            for ref in refs.values():
                if ref.owner == self.local_id:
                    self.refs.get(ref.ref_id)  # unknown, released or lost: named here
            wire["refs"] = {name: ref.ref_id for name, ref in refs.items()}
            wire["_ref_handles"] = list(refs.values())
            inputs = {name: v for name, v in inputs.items() if name not in refs}
        # The peer is chosen after encoding, so inputs are judged against the fastest
        # link: compressed only if that pays even there.
        compression = Compression(
            self.node.transport.link_throughput(None), codec=self.config.compression
        )
        try:
            wire["inputs"] = {
                name: encode_value(value, compression=compression) for name, value in inputs.items()
            }
        except ValueCodecError as exc:
            # The caller's value, refused before any peer saw it: local misuse.
            raise TaskInputError(exc.reason, f"an input cannot be sent: {exc.message}") from exc
        return wire

    def _ref_placement(
        self, wire: Any
    ) -> tuple[frozenset[str], Callable[[str], Awaitable[None]] | None]:
        """Where the task's refs are (a locality hint), and how to bring ours to a peer."""
        if not isinstance(wire, dict) or "_ref_handles" not in wire:
            return frozenset(), None
        handles: list[RemoteRef] = wire.pop("_ref_handles")
        ours = [h.ref_id for h in handles if h.owner == self.local_id]
        holders: set[str] = set()
        for handle in handles:
            if handle.owner == self.local_id:
                holders.update(self.refs.get(handle.ref_id).holders)
            else:
                holders.update(handle._holders)  # another peer's ref: the worker decides
        if not ours:
            return frozenset(holders), None

        async def prepare(target: str) -> None:
            await self.refs.ensure_held(ours, target)

        return frozenset(holders), prepare

    async def _adopt_kept(
        self,
        result: dict[str, Any],
        peer: str | None,
        replicas: int,
        task_id: str,
        function: str | None,
    ) -> None:
        """Outputs the peer kept become refs we own, in place of their values; with
        ``replicas`` > 1 other capable peers copy them from ``peer`` before we return."""
        kept = result.pop("kept", None)
        if not isinstance(kept, dict) or not kept or peer is None:
            return
        outputs = result.setdefault("outputs", {})
        adopted = []
        for name, descriptor in kept.items():
            try:
                ref = self.refs.adopt(
                    peer, descriptor, replicas=replicas, task_id=task_id, function=function
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise RefError(
                    Reason.MALFORMED, f"peer {peer[:16]} kept {name!r} badly: {exc}"
                ) from exc
            adopted.append((name, ref))
        if replicas > 1:
            # Copies are best effort: the task's outcome stands; a ref short of copies
            # is restored when a capable peer arrives.
            await asyncio.gather(*(self.refs.replicate(ref) for _, ref in adopted))
        for name, ref in adopted:
            handle = ref.handle(self.local_id)
            if name == KEPT_RESULT:
                result["value"] = handle
            else:
                outputs[name] = handle

    # -- resident data -----------------------------------------------------------------

    async def put(
        self, value: Any, *, peer: str | None = None, replicas: int = 1, reuse: bool = False
    ) -> RemoteRef:
        """Keep ``value`` on ``replicas`` peers (or ``peer``); see ``client.Coordinator.put``."""
        if not self.initialized:
            raise NotJoinedError("the coordinator is not initialised", Reason.NOT_INITIALIZED)
        if isinstance(value, RemoteRef):
            raise TaskInputError(Reason.BAD_ARGUMENTS, f"{value!r} is already a ref")
        try:
            payload = msgspec.msgpack.encode(encode_value(value))
        except ValueCodecError as exc:
            raise TaskInputError(exc.reason, f"the value cannot be put: {exc.message}") from exc
        if reuse:
            existing = self.refs.find_digest(content_digest(payload))
            if existing is not None and (peer is None or peer in existing.holders):
                return existing.handle(self.local_id)
        ref = await self.refs.put(
            payload, describe_value(value), peer=peer, replicas=replicas, shape=shape_of(value)
        )
        self.audit.record_quietly(
            "ref-put",
            peer=",".join(ref.holders),
            outcome="stored",
            detail={"ref_id": ref.ref_id, "size": ref.size},
        )
        return ref.handle(self.local_id)

    async def fetch(self, ref_id: str) -> Any:
        """The value of our ref ``ref_id``: the owner's copy, else a holder's."""
        ref = self.refs.get(ref_id)
        payload = ref.payload
        source = self.local_id
        if payload is None:
            problems = []
            for holder in [h for h in ref.holders if h in set(self.node.connected_peers())]:
                try:
                    reply = await self.node.endpoint.request(
                        holder, REF_GET, {"ref_id": ref_id}, timeout=120.0
                    )
                except (RemoteError, SwarmError) as exc:
                    problems.append(f"{holder[:16]}: {exc}")
                    continue
                got = reply.get("payload") if isinstance(reply, dict) else None
                if isinstance(got, bytes) and content_digest(got) == ref.digest:
                    payload, source = got, holder
                    break
                problems.append(f"{holder[:16]}: sent bytes that do not match the ref's hash")
            if payload is None:
                raise RefError(
                    Reason.REF_LOST,
                    f"ref {ref_id} could not be read: " + "; ".join(problems),
                    ref_id,
                )
        allow = source == self.local_id or self.config.policy.allows_pickle(source)
        try:
            return decode_value(msgspec.msgpack.decode(payload), allow_pickle=allow)
        except (ValueCodecError, msgspec.DecodeError) as exc:
            raise RefError(
                Reason.MALFORMED, f"ref {ref_id} cannot be decoded: {exc}", ref_id
            ) from exc

    async def release(self, ref_id: str) -> None:
        """Free our ref everywhere; unknown or already released is a ``RefError``."""
        await self.refs.release(ref_id)

    def ref_holders(self, ref_id: str) -> tuple[str, ...]:
        ref = self.refs.refs.get(ref_id)
        return tuple(ref.holders) if ref is not None else ()

    def ref_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Refs we own (where they are) and refs other peers keep here; with ``limit``,
        the newest ``limit`` of each (the dashboard's bounded read)."""
        owned = self.refs.records(limit)
        rows = [{**r, "role": "owned", "owner": self.local_id} for r in owned]
        for entry in self.ref_store.entries(limit):
            rows.append(
                {
                    "ref_id": entry.ref_id,
                    "size": entry.size,
                    "holders": [self.local_id],
                    "replicas": None,
                    "owner_copy": False,
                    "lost": False,
                    "state": str(RefState.SPILLED if entry.spilled else RefState.HELD),
                    "dtypes": dict(entry.dtypes),
                    "shape": None,
                    "digest": entry.digest,
                    "tasks": entry.reads,
                    "created_at": entry.stored_at,
                    "role": "held",
                    "owner": entry.owner,
                    "spilled": entry.spilled,
                }
            )
        return rows

    def _decode_outputs(
        self, task_type: str, result: dict[str, Any], peer: str | None
    ) -> dict[str, Any]:
        if task_type != "python-computation":
            return result
        allow = peer is not None and self.config.policy.allows_pickle(peer)
        # One budget for the whole result: each output having its own let eight small
        # compressed outputs expand to gigabytes together.
        budget = DecodeBudget()
        # The result's message is decoded once and read by nothing else: a frame may keep
        # its numeric columns in the received buffer (writable only where the link
        # handed that buffer over, see ``oob.parse``).
        try:
            if "value" in result:
                result["value"] = decode_value(
                    result["value"], allow_pickle=allow, budget=budget, exclusive=True
                )
            outputs = result.get("outputs")
            if isinstance(outputs, dict):
                result["outputs"] = {
                    k: decode_value(v, allow_pickle=allow, budget=budget, exclusive=True)
                    for k, v in outputs.items()
                }
        except ValueCodecError as exc:
            self.decode_refusals[str(exc.reason)] += 1
            if (peer, str(exc.reason)) not in self._decode_logged:
                self._decode_logged.add((peer, str(exc.reason)))
                log.warning("result from %s refused: %s", (peer or "?")[:16], exc)
            raise
        return result

    def watch_output(self, task_id: str, watcher: Callable[[str, str], None]) -> Callable[[], None]:
        """Call ``watcher(stream, text)`` on this loop as ``task_id``'s output arrives."""
        return self.delegator.watch_output(task_id, watcher)

    def task_output(self, task_id: str) -> dict[str, str] | None:
        """What a delegated task printed so far: ``{"stdout": ..., "stderr": ...}``."""
        entry = self.delegator.output.get(task_id)
        if entry is None:
            return None
        return {"stdout": entry.text("stdout"), "stderr": entry.text("stderr")}

    async def _run_locally(
        self, task_id: str, task_type: str, data: Any, timeout: float
    ) -> dict[str, Any]:
        return await self.task_server.run_local(task_id, task_type, data, timeout)

    async def execute_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run a task here, as a peer's request would (the blueprint's ``executeTask``)."""
        task_type = str(task.get("type") or task.get("name") or "")
        requirements_for_task_type(task_type)
        data = self._encode_inputs(task_type, task.get("data") or {})
        timeout = float(task.get("timeout") or self.config.delegation.default_timeout_s)
        result = await self.task_server.run_local(
            str(task.get("id") or "local"), task_type, data, timeout
        )
        return self._decode_outputs(task_type, result, self.local_id)

    # -- views -------------------------------------------------------------------------

    @property
    def isolation(self) -> str | None:
        """How this peer runs other peers' Python ("bubblewrap", "none"), None if it does not."""
        pool = self.executors.get("python-computation")
        isolation = getattr(pool, "isolation", None)
        return isolation if isinstance(isolation, str) else None

    @property
    def backend(self) -> str | None:
        """What runs other peers' Python here: "sandbox" or "dask"; None if nothing does."""
        pool = self.executors.get("python-computation")
        if pool is None:
            return None
        backend = getattr(pool, "backend", "sandbox")
        return backend if isinstance(backend, str) else "sandbox"

    def get_stats(self) -> dict[str, Any]:
        peers = []
        for view in self.node.peers():
            link = next(
                (i for i in self.node.transport.link_info() if i.peer_id == view.peer_id), None
            )
            peers.append(
                {
                    "id": view.peer_id,
                    "name": view.card.name if view.card else None,
                    "capabilities": view.capabilities,
                    "state": view.state,
                    "load": round(view.load_fraction, 3),
                    "in_flight": view.load.in_flight if view.load else 0,
                    "queued": view.load.queued if view.load else 0,
                    "concurrency": view.concurrency,
                    "rtt_ms": link.rtt_ms if link else None,
                    "connected_since": view.connected_since,
                    "route": link.route if link else None,
                    "local_candidate": link.local_candidate if link else None,
                    "remote_candidate": link.remote_candidate if link else None,
                    "ice_server": link.ice_server if link else None,
                    # The peer's WebRTC library ("aiortc", "native"): a mixed room shows here.
                    "transport_backend": link.backend if link else None,
                    "bytes_in": link.bytes_in if link else 0,
                    "bytes_out": link.bytes_out if link else 0,
                    "isolation": (view.card.isolation or None) if view.card else None,
                    "backend": (view.card.backend or None) if view.card else None,
                    "environment": dict(view.card.environment) if view.card else {},
                }
            )
        s = self.stats
        return {
            "initialized": self.initialized,
            "local_peer_id": self.local_id,
            "room": self.config.room,
            "connected_peers": len(self.node.connected_peers()),
            "total_peers": len(self.node.peers()),
            "capabilities": self.node.capabilities,
            "isolation": self.isolation,
            "backend": self.backend,
            "dask": dask.stats() if (dask := self._dask()) is not None else None,
            "environment": dict(self.environment),
            "transport_backend": getattr(self.node.transport, "backend", None),
            "peers": peers,
            "total_tasks": s.total_tasks,
            "tasks_completed": s.tasks_completed,
            "tasks_failed": s.tasks_failed,
            "tasks_canceled": s.tasks_canceled,
            "tasks_not_sent": s.tasks_not_sent,
            "tasks_served": s.tasks_served,
            "patterns_shared": s.patterns_shared,
            "reflections_integrated": s.reflections_integrated,
            "consensus_requests": s.consensus_requests,
            "knowledge_queries": s.knowledge_queries,
            "last_activity": s.last_activity,
            "load": {
                "in_flight": self.task_server.in_flight,
                "concurrency": self.task_server.concurrency,
            },
            "rejections": self.rejections(),
            # Live output: batches served to others (sent, bytes cut at the cap,
            # undelivered) and batches received for our own tasks.
            "output": {
                **{f"served_{k}": v for k, v in self.task_server.output_counters.items()},
                "received_batches": self.delegator.output_batches,
            },
            # Resident data: what we put elsewhere, and what others keep here.
            "refs": {**self.refs.stats(), "store": self.ref_service.stats()},
            "electorate": self.consensus.electorate.describe(),
            # > 0: another process proved this peer's key at the signaling server.
            "identity_conflicts": int(getattr(self.node.transport, "identity_conflicts", 0)),
        }

    # -- roster ------------------------------------------------------------------------

    async def change_roster(self, action: str, peer_id: str, name: str = "") -> dict[str, Any]:
        """``add`` / ``remove`` ``peer_id`` on the room's roster (this peer must own it, or
        no roster may exist yet: the first ``add`` makes one owned by this peer, with it on
        it), save it in the profile and send it to the connected peers at once."""
        electorate = self.consensus.electorate
        current = electorate.roster
        require_canonical(peer_id)
        if action == "add":
            if current is None and peer_id != self.local_id:
                current = with_member(self.identity, None, self.config.room, self.local_id, "me")
            updated = with_member(self.identity, current, self.config.room, peer_id, name)
        elif action == "remove":
            if current is None:
                raise RosterError(Reason.NOT_FOUND, "this room has no roster")
            updated = without_member(self.identity, current, peer_id)
        else:
            raise RosterError(Reason.BAD_ARGUMENTS, f"unknown roster action {action!r}")
        electorate.install(updated)
        await self.consensus.share_roster()
        self._notify("stats:changed", {"cause": "roster"})
        return electorate.describe()

    def rejections(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        # The task server's refusals reach the peer through the endpoint, which counts
        # every handler refusal: adding task_server.refusals too would count them twice.
        sources = (
            self.node.transport.rejections.by_reason,
            self.node.endpoint.rejections,
            self.node.card_rejections,
            self.decode_refusals,
            self.knowledge.answer_rejections,
            self.consensus.request_refusals,
            self.delegator.output_refusals,
        )
        for source in sources:
            for reason, n in source.items():
                counts[reason] = counts.get(reason, 0) + n
        return counts

    def dashboard_snapshot(self) -> dict[str, Any]:
        snapshot = self.get_stats()
        now = time.time()
        snapshot["tasks_in_flight"] = [
            {
                "id": r.id,
                "type": r.type,
                "peer": r.peer,
                "state": r.state,
                "elapsed_s": round(now - r.submitted_at, 1),
            }
            for r in self.tasks.in_flight()
            if r.role == "delegated"
        ][:20]
        snapshot["latest_consensus"] = self.consensus.latest()
        snapshot["latest_reflections"] = self.knowledge.latest_reflections(5)
        snapshot["transfer_rate"] = {
            "interval_s": SAMPLE_INTERVAL_S,
            "samples": self.transfer.as_rows(),
        }
        return snapshot

    def task_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Every record, or (``limit``) the most recent ones and any still running."""
        records = self.tasks.all() if limit is None else self.tasks.recent(limit)
        return [r.as_dict() for r in records]

    def task_record(self, task_id: str) -> dict[str, Any] | None:
        record = self.tasks.get(task_id)
        return None if record is None else record.as_dict()

    def peer_name(self, peer_id: str) -> str | None:
        """The name a peer gave itself on its signed agent card (display only)."""
        view = self.node.peer(peer_id)
        return view.card.name if view is not None and view.card is not None else None

    async def wait_for_reflection(
        self, timeout: float, shared_from: str | None = None
    ) -> dict[str, Any] | None:
        """Wait until the store holds a reflection another peer shared (``shared_from``
        that peer, if given); returns its row, or None at ``timeout``."""
        arrived = asyncio.Event()

        def found() -> dict[str, Any] | None:
            for row in self.knowledge.reflection_records():
                if row["shared_from"] and shared_from in (None, row["shared_from"]):
                    return row
            return None

        unsubscribe = self.events.on("swarm:reflection-integrated", lambda _p: arrived.set())
        try:
            async with asyncio.timeout(timeout):
                while (row := found()) is None:
                    arrived.clear()
                    await arrived.wait()
                return row
        except TimeoutError:
            return None
        finally:
            unsubscribe()

    async def settle(
        self, timeout: float, count: int | None = None, capability: str | None = None
    ) -> list[str]:
        """Wait until the room's members (or ``count`` peers) are connected and advertised
        their capabilities (``capability`` among them, if given).

        Returns what is still missing at ``timeout``: member ids, or a placeholder for
        peers not even in the room yet.
        """
        changed = asyncio.Event()

        def ready(peer_id: str) -> bool:
            view = self.node.peer(peer_id)
            return (
                view is not None
                and view.state == "connected"
                and view.card is not None
                and (capability is None or capability in view.capabilities)
            )

        def pending() -> list[str]:
            if count is None:
                return [m for m in self.node.transport.room_members() if not ready(m)]
            have = sum(1 for v in self.node.peers() if ready(v.peer_id))
            return ["(not yet in the room)"] * max(0, count - have)

        unsubscribe = self.events.on("stats:changed", lambda _payload: changed.set())
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
