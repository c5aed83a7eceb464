"""Resident data on the owner's side: ``RemoteRef`` handles and the refs this peer put.

``put`` sends a value's encoded bytes to ``replicas`` capable peers (least loaded first,
or the one named) and keeps the owner's copy, so a holder that dies costs nothing: its
refs are copied again, from a surviving holder peer to peer or (none left) re-pushed from
the owner's copy. A task naming refs runs on a holder when one is capable; otherwise the
chosen peer copies the data from a holder, peer to peer, or (no holder reachable) the owner
pushes it. Outputs a task keeps (``keep=``) have no owner copy: with ``keep_replicas=n``
the owner has ``n - 1`` more capable peers copy them from the producer, peer to peer, before
the task's result is handed back, and whenever a holder leaves (or a capable peer arrives
while a ref is short of copies) it restores the count from a surviving holder. Only when
every holder of a kept output is gone is it lost: using it raises ``ref-lost`` naming the
holders that left and the task that made it. That task is never re-run by itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import RefError, RemoteError, SwarmError, UsageError
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.membership.routing import choose_peer
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.messages import PYTHON_EXECUTION, REF_PULL, REF_PUT, REF_RELEASE
from swarm_notebook.workload.store import content_digest

log = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]
PUT_TIMEOUT_S = 120.0
RELEASE_TIMEOUT_S = 5.0
MAX_REMEMBERED_RELEASED = 4096
# The output name a submitted function's return value is kept under (``submit(keep=True)``).
KEPT_RESULT = "__swarm_result__"
# Always in stats (0 until it happens): a dashboard should not need to guess them.
DURABILITY_COUNTERS = ("replications", "repushes", "replication_failures", "lost")


class RefState(StrEnum):
    """Where a ref's data is, as the dashboard and ``refs_frame()`` show it."""

    HELD = "held"  # in a holder's memory (or, for a ref we own, on its holders)
    SPILLED = "spilled"  # held here, in the spill folder instead of memory
    LOCAL = "local"  # only the owner's copy: no holder now (the next task re-pushes it)
    LOST = "lost"  # a kept output whose only holder left


class RefClient(Protocol):
    """What a bound ``RemoteRef`` calls: the notebook's ``Coordinator``."""

    async def fetch(self, ref: RemoteRef) -> Any: ...

    async def release(self, ref: RemoteRef) -> None: ...

    def ref_holders(self, ref_id: str) -> tuple[str, ...]: ...


class RemoteRef:
    """A value kept on other peers: pass it to tasks instead of the value itself.

    ``owner`` is the peer that put it (only its tasks may read it), ``holders`` the peers
    keeping a copy now, ``size`` its encoded bytes, ``dtypes`` a summary of its columns,
    ``digest`` the content hash of its encoded bytes. ``await ref.fetch()`` brings the value
    home; ``await ref.release()`` frees it everywhere.
    """

    __slots__ = ("_client", "_holders", "digest", "dtypes", "owner", "ref_id", "shape", "size")

    def __init__(
        self,
        ref_id: str,
        owner: str,
        size: int,
        digest: str,
        dtypes: Mapping[str, str] | None = None,
        holders: Iterable[str] = (),
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.ref_id = ref_id
        self.owner = owner
        self.size = size
        self.digest = digest
        self.dtypes = dict(dtypes or {})
        self.shape = shape
        self._holders = tuple(holders)
        self._client: RefClient | None = None

    def bind(self, client: RefClient) -> RemoteRef:
        """Attach the coordinator that ``fetch`` / ``release`` go through."""
        self._client = client
        return self

    @property
    def holders(self) -> tuple[str, ...]:
        if self._client is not None:
            return self._client.ref_holders(self.ref_id)
        return self._holders

    def _bound(self) -> RefClient:
        if self._client is None:
            raise UsageError(
                Reason.BAD_ARGUMENTS, f"ref {self.ref_id} is not bound to a coordinator"
            )
        return self._client

    async def fetch(self) -> Any:
        """The value, decoded here (from the owner's copy, or from a holder)."""
        return await self._bound().fetch(self)

    async def release(self) -> None:
        """Free the value on every holder; the ref cannot be used afterwards."""
        await self._bound().release(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteRef) and other.ref_id == self.ref_id

    def __hash__(self) -> int:
        return hash(self.ref_id)

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}: {v}" for k, v in list(self.dtypes.items())[:4])
        more = ", ..." if len(self.dtypes) > 4 else ""
        return (
            f"<RemoteRef {self.ref_id[:8]} {self.size} bytes on {len(self.holders)} peer(s)"
            + (f" {{{cols}{more}}}" if cols else "")
            + ">"
        )


@dataclass
class OwnedRef:
    """A ref this peer owns: where it is, and the owner's copy (None for kept outputs)."""

    ref_id: str
    size: int
    digest: str
    token: str
    dtypes: dict[str, str]
    payload: bytes | None
    holders: list[str] = field(default_factory=list)
    replicas: int = 1
    shape: tuple[int, ...] | None = None
    lost: bool = False
    created_at: float = field(default_factory=time.time)
    tasks: int = 0  # tasks that used it
    task_id: str | None = None  # the task that kept it (None for put refs)
    function: str | None = None  # that task's function name, when ``submit`` made it
    gone: list[str] = field(default_factory=list)  # holders that left, by name

    def made_by(self) -> str:
        """Which task made this ref, as a user would re-run it."""
        if self.task_id is None:
            return "a put"
        return f"task {self.task_id}" + (f" ({self.function})" if self.function else "")

    @property
    def state(self) -> RefState:
        if self.lost:
            return RefState.LOST
        return RefState.HELD if self.holders else RefState.LOCAL

    def handle(self, owner: str) -> RemoteRef:
        return RemoteRef(
            self.ref_id, owner, self.size, self.digest, self.dtypes, self.holders, self.shape
        )


class RefOwner:
    """The refs this peer put (or kept), and moving them to where tasks run."""

    def __init__(self, node: SwarmNode, notify: Notify) -> None:
        self.node = node
        self.notify = notify
        self.refs: dict[str, OwnedRef] = {}
        self._released: dict[str, None] = {}
        self._moving: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._restoring: set[str] = set()  # refs with a restore under way
        self._names: dict[str, str] = {}  # holders' card names, kept for after they left
        self._background = OwnedTasks("refs")
        self.counters: Counter[str] = Counter()
        node.add_listener(self._peer_changed)

    # -- lookups -----------------------------------------------------------------------

    def get(self, ref_id: str) -> OwnedRef:
        """Our live ref ``ref_id``, or ``RefError`` naming it."""
        ref = self.refs.get(ref_id)
        if ref is not None:
            if ref.lost:
                left = ", ".join(ref.gone) or "its holders"
                raise RefError(
                    Reason.REF_LOST,
                    f"ref {ref_id} is lost: every peer holding a copy left ({left}); it was "
                    f"kept by {ref.made_by()}, which is not re-run by itself: re-run it to "
                    "make the value again",
                    ref_id,
                )
            return ref
        if ref_id in self._released:
            raise RefError(Reason.REF_NOT_FOUND, f"ref {ref_id} was released", ref_id)
        raise RefError(Reason.REF_NOT_FOUND, f"ref {ref_id} does not exist here", ref_id)

    def find_digest(self, digest: str) -> OwnedRef | None:
        """A live ref with this content (the magic's reuse of an unchanged frame)."""
        for ref in self.refs.values():
            if ref.digest == digest and not ref.lost and ref.payload is not None:
                return ref
        return None

    def _capable(self, exclude: Iterable[str]) -> list[str]:
        skipped = set(exclude)
        return [
            c.peer_id
            for c in self.node.candidates()
            if PYTHON_EXECUTION in c.capabilities and c.peer_id not in skipped
        ]

    def _label(self, peer_id: str) -> str:
        """``name (short id)`` of a peer; the name is remembered once seen on its card."""
        view = self.node.peer(peer_id)
        if view is not None and view.card is not None and view.card.name:
            self._names[peer_id] = view.card.name
        name = self._names.get(peer_id)
        return f"{name} ({peer_id[:16]})" if name else peer_id[:16]

    def _add_holder(self, ref: OwnedRef, peer_id: str) -> None:
        if peer_id not in ref.holders:
            ref.holders.append(peer_id)
        self._label(peer_id)  # its name, for a message after it has left

    # -- put ---------------------------------------------------------------------------

    async def put(
        self,
        payload: bytes,
        dtypes: dict[str, str],
        *,
        peer: str | None,
        replicas: int,
        shape: tuple[int, ...] | None = None,
    ) -> OwnedRef:
        """Store ``payload`` on ``peer`` (or ``replicas`` least-loaded capable peers)."""
        if replicas < 1:
            raise UsageError(Reason.BAD_ARGUMENTS, f"replicas must be >= 1, got {replicas}")
        ref = OwnedRef(
            uuid.uuid4().hex,
            len(payload),
            content_digest(payload),
            secrets.token_hex(16),
            dtypes,
            payload,
            replicas=replicas,
            shape=shape,
        )
        refusals: list[str] = []
        if peer is not None:
            await self._push(ref, peer)  # raises with the peer's reason
        else:
            tried: list[str] = []
            while len(ref.holders) < replicas:
                target = self._pick(exclude=tried)
                if target is None:
                    break
                tried.append(target)
                try:
                    await self._push(ref, target)
                except RefError as exc:
                    refusals.append(f"{target[:16]}: {exc.reason}: {exc.message}")
        if not ref.holders:
            full = any(Reason.STORE_FULL in r for r in refusals)
            detail = "; ".join(refusals) or "no connected peer offers python-execution"
            raise RefError(
                Reason.STORE_FULL if full else Reason.NO_CAPABLE_PEER,
                f"no peer took the value ({ref.size} bytes; it stays here): {detail}",
                ref.ref_id,
            )
        self.refs[ref.ref_id] = ref
        self.counters["puts"] += 1
        self.notify("refs:changed", {"ref_id": ref.ref_id})
        return ref

    def _pick(self, exclude: Iterable[str]) -> str | None:
        skipped = set(exclude)
        candidates = [
            c
            for c in self.node.candidates()
            if c.peer_id not in skipped and PYTHON_EXECUTION in c.capabilities
        ]
        chosen = choose_peer(candidates, [PYTHON_EXECUTION])
        return chosen.peer_id if chosen else None

    async def _push(self, ref: OwnedRef, target: str) -> None:
        if ref.payload is None:
            raise RefError(
                Reason.REF_LOST, f"ref {ref.ref_id} has no owner copy to push", ref.ref_id
            )
        body = {
            "ref_id": ref.ref_id,
            "digest": ref.digest,
            "token": ref.token,
            "payload": ref.payload,
            "dtypes": ref.dtypes,
        }
        try:
            await self.node.endpoint.request(target, REF_PUT, body, timeout=PUT_TIMEOUT_S)
        except RemoteError as exc:
            raise RefError(
                exc.reason,
                f"peer {target[:16]} refused ref {ref.ref_id}: {exc.message}",
                ref.ref_id,
            ) from exc
        except SwarmError as exc:
            raise RefError(
                exc.reason, f"ref {ref.ref_id} could not reach {target[:16]}: {exc}", ref.ref_id
            ) from exc
        self.counters["bytes_pushed"] += ref.size
        self.counters["pushes"] += 1
        self._add_holder(ref, target)

    # -- kept outputs ------------------------------------------------------------------

    def adopt(
        self,
        holder: str,
        descriptor: Mapping[str, Any],
        *,
        replicas: int = 1,
        task_id: str | None = None,
        function: str | None = None,
    ) -> OwnedRef:
        """Register an output task ``task_id`` kept on ``holder`` (no owner copy); it is
        to have ``replicas`` holders (``replicate`` makes the others)."""
        if replicas < 1:
            raise UsageError(Reason.BAD_ARGUMENTS, f"keep_replicas must be >= 1, got {replicas}")
        ref = OwnedRef(
            str(descriptor["ref_id"]),
            int(descriptor["size"]),
            str(descriptor["digest"]),
            str(descriptor["token"]),
            dict(descriptor.get("dtypes") or {}),
            None,
            replicas=replicas,
            task_id=task_id,
            function=function,
        )
        self._add_holder(ref, holder)
        self.refs[ref.ref_id] = ref
        self.counters["kept"] += 1
        self.notify("refs:changed", {"ref_id": ref.ref_id})
        return ref

    # -- moving data to where a task runs ----------------------------------------------

    async def ensure_held(self, ref_ids: Iterable[str], target: str) -> None:
        """Make ``target`` hold every ref: a copy from a holder, else the owner's push."""
        for ref_id in ref_ids:
            ref = self.get(ref_id)
            ref.tasks += 1
            if target in ref.holders:
                continue
            key = (ref_id, target)
            moving = self._moving.get(key)
            if moving is None:
                moving = asyncio.ensure_future(self._move(ref, target))
                self._moving[key] = moving
                moving.add_done_callback(functools.partial(self._moved, key))
            await asyncio.shield(moving)

    def _moved(self, key: tuple[str, str], future: asyncio.Future[None]) -> None:
        self._moving.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here: every waiter re-raises it

    async def _move(self, ref: OwnedRef, target: str) -> None:
        if await self._copy(ref, target):
            self.counters["peer_copies"] += 1
        else:
            self.counters["owner_pushes_for_tasks"] += 1

    async def _copy(self, ref: OwnedRef, target: str) -> bool:
        """Give ``target`` a copy: from a holder, peer to peer (True), else the owner's
        push (False). What ``target`` stores is ours: only our tasks may read it."""
        connected = set(self.node.connected_peers())
        problems = []
        full = False  # the target had no room: another peer may (the delegator moves on)
        for source in [h for h in ref.holders if h in connected and h != target]:
            body = {
                "ref_id": ref.ref_id,
                "source": source,
                "digest": ref.digest,
                "token": ref.token,
                "dtypes": ref.dtypes,
            }
            try:
                await self.node.endpoint.request(target, REF_PULL, body, timeout=PUT_TIMEOUT_S)
            except SwarmError as exc:
                problems.append(f"from {self._label(source)}: {exc}")
                full = full or exc.reason == Reason.STORE_FULL
                continue
            self._add_holder(ref, target)
            self.notify("refs:changed", {"ref_id": ref.ref_id})
            return True
        if ref.payload is None:
            holders = ", ".join(self._label(h) for h in ref.holders) or "none"
            why = "; ".join(problems) or f"none of its holders is connected ({holders})"
            raise RefError(
                Reason.STORE_FULL if full else Reason.REF_LOST,
                f"ref {ref.ref_id} (kept by {ref.made_by()}) could not be copied to "
                f"{self._label(target)}: {why}",
                ref.ref_id,
            )
        await self._push(ref, target)
        self.notify("refs:changed", {"ref_id": ref.ref_id})
        return False

    # -- replicas ----------------------------------------------------------------------

    def replicate(self, ref: OwnedRef) -> Awaitable[None]:
        """Bring ``ref`` to its replica count now, as far as capable peers allow."""
        # Marked before the first await: a card arriving meanwhile starts no second copy.
        self._restoring.add(ref.ref_id)
        return self._restore(ref)

    def _short(self, ref: OwnedRef) -> bool:
        live = not ref.lost and bool(ref.holders or ref.payload)
        return live and len(ref.holders) < ref.replicas

    def _schedule_restore(self, ref: OwnedRef) -> None:
        if ref.ref_id in self._restoring:
            return  # the running restore re-checks the count until it holds
        self._restoring.add(ref.ref_id)
        self._background.spawn(self._restore(ref), name=f"restore-{ref.ref_id[:8]}")

    async def _restore(self, ref: OwnedRef) -> None:
        """Copy ``ref`` to other capable peers until it has ``replicas`` holders: from a
        surviving holder peer to peer, else (a put ref) from the owner's copy."""
        self._restoring.add(ref.ref_id)
        tried: set[str] = set()
        try:
            while self._short(ref) and self.refs.get(ref.ref_id) is ref:
                target = self._pick(exclude=[*ref.holders, *tried])
                if target is None:
                    return  # nobody yet: a capable peer's card arriving starts this again
                tried.add(target)
                try:
                    pulled = await self._copy(ref, target)
                except RefError as exc:
                    self.counters["replication_failures"] += 1
                    log.info("copy of ref %s to %s failed: %s", ref.ref_id[:8], target[:16], exc)
                    continue
                # replications: peer-to-peer copies; repushes: the owner's own copy sent.
                self.counters["replications" if pulled else "repushes"] += 1
        finally:
            self._restoring.discard(ref.ref_id)

    # -- holders leaving ---------------------------------------------------------------

    def _peer_changed(self, peer_id: str, what: str) -> None:
        if what == "card":
            # A capable peer arrived (or its card changed): refs short of copies may grow.
            if peer_id in self._capable(exclude=()):
                for ref in self.refs.values():
                    if self._short(ref):
                        self._schedule_restore(ref)
            return
        if what != "down":
            return
        for ref in self.refs.values():
            if peer_id not in ref.holders:
                continue
            ref.holders.remove(peer_id)
            ref.gone.append(self._label(peer_id))
            if ref.payload is None and not ref.holders:
                ref.lost = True
                self.counters["lost"] += 1
                log.warning("ref %s is lost: its last holder %s left", ref.ref_id[:8], peer_id[:16])
                continue
            if len(ref.holders) < ref.replicas:
                self._schedule_restore(ref)
        self.notify("refs:changed", {"peer_id": peer_id})

    # -- release -----------------------------------------------------------------------

    async def release(self, ref_id: str) -> None:
        """Free ``ref_id`` on its holders and forget it (``RefError`` if unknown)."""
        ref = self.refs.get(ref_id)  # a lost ref can still be released (and forgotten)
        if ref is None:
            self.get(ref_id)  # raises naming it
            return
        self._forget(ref)
        await self._tell_holders({h: [ref_id] for h in ref.holders})

    def _forget(self, ref: OwnedRef) -> None:
        self.refs.pop(ref.ref_id, None)
        self._released[ref.ref_id] = None
        while len(self._released) > MAX_REMEMBERED_RELEASED:
            self._released.pop(next(iter(self._released)))
        self.counters["released"] += 1
        self.notify("refs:changed", {"ref_id": ref.ref_id})

    async def _tell_holders(self, by_holder: Mapping[str, list[str]]) -> None:
        connected = set(self.node.connected_peers())

        async def tell(holder: str, ids: list[str]) -> None:
            try:
                await self.node.endpoint.request(
                    holder, REF_RELEASE, {"ref_ids": ids}, timeout=RELEASE_TIMEOUT_S
                )
            except SwarmError as exc:
                # It left (and dropped our refs with us), or will when we leave.
                log.debug("release at %s: %s", holder[:16], exc)

        await asyncio.gather(*(tell(h, ids) for h, ids in by_holder.items() if h in connected))

    async def release_all(self) -> int:
        """Release every ref (on leave); returns how many."""
        by_holder: dict[str, list[str]] = {}
        refs = list(self.refs.values())
        for ref in refs:
            for holder in ref.holders:
                by_holder.setdefault(holder, []).append(ref.ref_id)
            self._forget(ref)
        await self._tell_holders(by_holder)
        return len(refs)

    async def close(self) -> None:
        await self._background.close()
        for moving in list(self._moving.values()):
            moving.cancel()

    # -- views -------------------------------------------------------------------------

    def records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Our refs, oldest first; with ``limit``, only the newest ``limit``."""
        refs = list(self.refs.values())  # put order: the newest last
        if limit is not None:
            refs = refs[-limit:] if limit > 0 else []
        return [
            {
                "ref_id": r.ref_id,
                "size": r.size,
                "holders": list(r.holders),
                "replicas": r.replicas,
                "owner_copy": r.payload is not None,
                "lost": r.lost,
                "state": str(r.state),
                "dtypes": dict(r.dtypes),
                "shape": r.shape,
                "digest": r.digest,
                "tasks": r.tasks,
                "created_at": r.created_at,
                "made_by": r.made_by(),
            }
            for r in refs
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "owned": len(self.refs),
            "owned_bytes": sum(r.size for r in self.refs.values()),
            # Live refs with fewer holders than asked for (waiting for a capable peer).
            "under_replicated": sum(1 for r in self.refs.values() if self._short(r)),
            **dict.fromkeys(DURABILITY_COUNTERS, 0),
            # Lost now (still listed until released); "lost" counts every loss so far.
            "owned_lost": sum(1 for r in self.refs.values() if r.lost),
            **dict(self.counters),
        }
