"""The delegating side: send a task to the best peer, retry elsewhere, report it once.

The least-loaded capable peer gets the task. A peer that dies, times out or refuses
costs one attempt and the task moves on (bounded); a peer that is merely full makes the
task wait in a FIFO for a slot. Every task ends exactly once, with a state and a reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from packaging.specifiers import SpecifierSet

from swarm_notebook.errors import (
    AttemptsExhausted,
    DelegationError,
    DelegationTimeout,
    NoCapablePeerError,
    PeerUnavailable,
    ProtocolError,
    RefError,
    RemoteError,
    RequestTimeout,
    TaskInputError,
    TaskRefused,
    UsageError,
)
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.agent_card import LoadReport
from swarm_notebook.membership.node import PeerState, PeerView, SwarmNode
from swarm_notebook.membership.routing import choose_peer
from swarm_notebook.membership.versions import unmet
from swarm_notebook.protocol import oob
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.messages import (
    FINAL_REFUSALS,
    TASK_EXECUTION,
    TASK_OUTPUT,
    TASK_STATUS,
    TEMPORARY_REFUSALS,
    TaskOutput,
    TaskRequest,
    TaskStatus,
    requirements_for_task_type,
)
from swarm_notebook.workload.output import OutputLog, OutputWatcher
from swarm_notebook.workload.records import TaskLog, TaskRecord, TaskState

log = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]


class WireData:
    """Task data encoded once per attempt, given away to it.

    A task waits for its reply much longer than it takes to send: holding the encoded
    inputs (a frame's Arrow bytes) for a possible retry kept them next to the result
    arriving. The first attempt takes ``first``; a retry encodes the caller's values again.
    Data with less than ``KEEP_BYTES`` of large binaries is kept and reused instead (a
    retry after a busy peer would otherwise encode it again each time).
    """

    KEEP_BYTES = 1 << 20

    def __init__(self, first: Any, encode: Callable[[], Any]) -> None:
        self._first: Any = first
        self._keep = sum(b.nbytes for b in oob.split(first)[1]) < self.KEEP_BYTES
        self._taken = False
        self._encode = encode

    def take(self) -> Any:
        """The encoded data for one attempt (kept here only when it is small)."""
        if self._keep:
            return self._first
        if not self._taken:
            self._taken = True
            first, self._first = self._first, None
            return first
        return self._encode()


def _take(data: Any) -> Any:
    return data.take() if isinstance(data, WireData) else data


# Moving a ref to a peer failed in a way another peer may not share: try the next one.
MOVABLE_REF_FAILURES = frozenset({Reason.STORE_FULL, Reason.PEER_UNAVAILABLE, Reason.TIMEOUT})


@dataclass
class DelegationConfig:
    max_attempts: int = 3
    default_timeout_s: float = 60.0
    reply_grace_s: float = 10.0
    run_locally_when_alone: bool = False
    # Right after join() links are up before their agent cards arrive (0.2-0.6 s here):
    # a task waits this long for a capable peer's card instead of failing at once.
    card_wait_s: float = 10.0


def _label(view: PeerView) -> str:
    """``name id…`` for messages: the card's name when it has come, the id always."""
    name = f"{view.card.name} " if view.card is not None else ""
    return f"{name}{view.peer_id[:16]}"


class Delegator:
    """The delegating side of ``delegate_task``."""

    def __init__(
        self,
        node: SwarmNode,
        tasks: TaskLog,
        stats: CoordinationStats,
        notify: Notify,
        settings: DelegationConfig,
        local_runner: Callable[[str, str, Any, float], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.tasks = tasks
        self.stats = stats
        self.notify = notify
        self.settings = settings
        self._local_runner = local_runner
        self._rng = rng or random.Random()
        # Tasks waiting for a peer with room, first come first served. Each finished attempt
        # wakes one; a new peer or card wakes all. No polling: with thousands of tasks
        # gathered at once, waking everyone on every change costs waiters x completions.
        self._waiters: deque[asyncio.Future[None]] = deque()
        # What running tasks print, as it arrives; refusals counted by why.
        self.output = OutputLog()
        self.output_refusals: Counter[str] = Counter()
        self.output_batches = 0
        node.endpoint.register_message_handler(TASK_STATUS, self._on_status, schema=TaskStatus)
        node.endpoint.register_message_handler(TASK_OUTPUT, self._on_output, schema=TaskOutput)
        node.add_listener(self._peer_changed)

    def _peer_changed(self, _peer: str, what: str) -> None:
        if what in ("up", "card"):
            self._wake(len(self._waiters))

    def _wake(self, count: int = 1) -> None:
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def _wait_for_capacity(self, deadline: float) -> bool:
        """Wait until a peer may have room; False once ``deadline`` passes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, remaining)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # we were woken for a slot we will not use: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        return True

    def _on_status(self, peer_id: str, status: TaskStatus) -> None:
        record = self.tasks.get(status.task_id)
        if record is None or record.peer != peer_id or record.done:
            return  # only the peer running the task may report on it
        if status.state == TaskState.WORKING:
            self._working(record)

    def _working(self, record: TaskRecord) -> None:
        if record.state is TaskState.SUBMITTED:
            record.state = TaskState.WORKING
            record.started_at = time.time()
            self.notify("task:working", record.as_dict())

    def _on_output(self, peer_id: str, message: TaskOutput) -> None:
        record = self.tasks.get(message.task_id)
        if record is None or record.role != "delegated":
            self.output_refusals["unknown-task"] += 1
            return
        if record.peer != peer_id or record.done:
            self.output_refusals["not-running-there"] += 1  # only the running peer may add
            return
        problem = self.output.accept(record.id, peer_id, message)
        if problem is not None:
            self.output_refusals["out-of-order"] += 1
            log.debug("task output from %s refused: %s", peer_id[:16], problem)
            return
        self.output_batches += 1
        # Output from the peer running it says the task runs, before (or without) its
        # "working" message, which a task sends only once it has run a while.
        self._working(record)

    def watch_output(self, task_id: str, watcher: OutputWatcher) -> Callable[[], None]:
        """Call ``watcher(stream, text)`` as ``task_id``'s output arrives (network loop)."""
        return self.output.watch(task_id, watcher)

    async def delegate(
        self,
        task_type: str,
        data: Any,
        *,
        timeout: float | None = None,
        peer: str | None = None,
        task_id: str | None = None,
        max_attempts: int | None = None,
        requires: Mapping[str, SpecifierSet] | None = None,
        prefer: Collection[str] = (),
        prepare: Callable[[str], Awaitable[None]] | None = None,
    ) -> tuple[TaskRecord, dict[str, Any]]:
        """Run the task on a peer: returns what the peer reported, or raises.

        ``task_id`` lets a caller know the id before the task starts; ``max_attempts``
        bounds how many peers may try it (default: the settings'); ``requires`` admits only
        peers whose cards report package versions that meet it (``membership/versions.py``).
        ``prefer`` names the peers holding the task's resident data (chosen first when
        capable) and ``prepare(peer)`` runs before the task is sent there (it moves the
        data; a ``RefError`` from it costs that peer one attempt).

        Raises a ``DelegationError`` when no peer ran it and a ``UsageError`` for input
        refused before any peer saw it (see ``client.Coordinator.delegate_task``).
        """
        requirements = requirements_for_task_type(task_type)
        timeout = self.settings.default_timeout_s if timeout is None else timeout
        record = self.tasks.add(
            TaskRecord(id=task_id or uuid.uuid4().hex, type=task_type, role="delegated")
        )
        self.stats.total_tasks += 1
        self.stats.touch("task")
        self.notify("task:submitted", record.as_dict())
        try:
            result = await self._attempts(
                record,
                requirements,
                data,
                timeout,
                peer,
                max_attempts,
                requires or {},
                prefer,
                prepare,
            )
        except asyncio.CancelledError:
            self._finish(record, TaskState.CANCELED, "canceled by the caller")
            raise
        except DelegationTimeout as exc:
            self._finish(record, TaskState.FAILED, str(exc), sent=record.peer is not None)
            raise
        except (DelegationError, UsageError) as exc:
            # Never sent: the caller's input, or nobody to send it to.
            sent = record.peer is not None and not isinstance(exc, UsageError)
            self._finish(record, TaskState.REJECTED, str(exc), sent=sent)
            raise
        except Exception as exc:
            # Whatever went wrong, the task still ends exactly once, and says why.
            self._finish(record, TaskState.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        success = bool(result.get("success"))
        self._finish(
            record,
            TaskState.COMPLETED if success else TaskState.FAILED,
            None if success else result.get("error"),
        )
        return record, result

    async def _attempts(
        self,
        record: TaskRecord,
        requirements: list[str],
        data: Any,
        timeout: float,
        peer: str | None,
        max_attempts: int | None = None,
        requires: Mapping[str, SpecifierSet] | None = None,
        prefer: Collection[str] = (),
        prepare: Callable[[str], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        specs = requires or {}
        if peer is not None and specs:
            self._check_named_peer(peer, specs)
        refusals: list[str] = []
        attempts = 1 if peer is not None else (max_attempts or self.settings.max_attempts)
        # Waiting for a free slot counts against the task's timeout, like a queue would.
        deadline = time.monotonic() + timeout
        backoff = 0.0
        while record.attempts < attempts:
            target = peer
            if target is None:
                candidate, capable = self._choose(requirements, record.tried_peers, specs, prefer)
                if candidate is None and capable:
                    # Every capable peer is at its advertised capacity: wait, do not fail.
                    if await self._wait_for_capacity(deadline):
                        continue
                    raise DelegationTimeout(
                        f"no capable peer had room for the task within {timeout:g} s"
                    )
                if candidate is None and await self._wait_for_cards(record, deadline):
                    continue
                if candidate is None:
                    if self._local_runner is not None and self.settings.run_locally_when_alone:
                        return await self._run_locally(record, _take(data), timeout)
                    raise self._no_peer_error(record.type, requirements, refusals, specs)
                target = candidate
            if prepare is not None:
                try:
                    await prepare(target)
                except RefError as exc:
                    if peer is not None or exc.reason not in MOVABLE_REF_FAILURES:
                        raise
                    record.attempts += 1
                    record.tried_peers.append(target)
                    refusals.append(f"{target[:16]}: {exc.reason}: {exc.message}")
                    continue
            record.peer = target
            record.attempts += 1
            record.state = TaskState.SUBMITTED
            view = self.node.peer(target)
            if view is not None:
                view.outstanding += 1
            request = TaskRequest(
                task_id=record.id, type=record.type, data=_take(data), timeout=timeout
            )
            body = msgspec.structs.asdict(request)  # bytes stay bytes (to_builtins base64s them)
            # Only the endpoint holds the encoded data while the reply is awaited, and it
            # lets go once the request is sent.
            asking = self.node.endpoint.request_detailed(
                target, TASK_EXECUTION, body, timeout=timeout + self.settings.reply_grace_s
            )
            del request, body
            try:
                reply = await asking
            except RemoteError as exc:
                if (
                    exc.reason in TEMPORARY_REFUSALS
                    and peer is None
                    and time.monotonic() < deadline
                ):
                    # Full with other delegators' work, or we are too fast for it: back off
                    # and try again; this is not the peer failing the task.
                    record.attempts -= 1
                    backoff = min(1.0, max(0.02, backoff * 2))
                    pause = min(backoff * random.uniform(0.5, 1.0), deadline - time.monotonic())
                    await asyncio.sleep(max(0.0, pause))
                    continue
                record.tried_peers.append(target)
                refusals.append(f"{target[:16]}: {exc.reason}: {exc.message}")
                if exc.reason in FINAL_REFUSALS or peer is not None:
                    raise TaskRefused(
                        exc.reason, f"peer {target[:16]} refused the task: {exc.message}", target
                    ) from exc
                continue
            except ProtocolError as exc:
                # Our own request broke a protocol limit (e.g. too large): caught before any
                # peer saw it, so it is the caller's to fix, not the swarm's.
                raise TaskInputError(
                    Reason.TOO_LARGE if exc.reason == Reason.OVERSIZED else exc.reason,
                    f"the task could not be sent: {exc.message}",
                ) from exc
            except (TypeError, msgspec.EncodeError) as exc:
                # msgpack cannot carry a value in the data (an object, a set...): ours to fix.
                raise TaskInputError(
                    Reason.UNSUPPORTED_TYPE, f"the task data cannot be sent: {exc}"
                ) from exc
            except (PeerUnavailable, RequestTimeout) as exc:
                record.tried_peers.append(target)
                refusals.append(f"{target[:16]}: {exc}")
                continue
            finally:
                if view is not None and view.outstanding > 0:
                    view.outstanding -= 1
                self._wake()
            record.bytes_out += reply.bytes_out
            record.bytes_in += reply.bytes_in
            body = reply.body if isinstance(reply.body, dict) else {}
            load = body.pop("load", None)
            if isinstance(load, dict):
                try:
                    self.node.update_load(target, msgspec.convert(load, LoadReport))
                except msgspec.ValidationError:
                    pass
            body.pop("task_id", None)
            return body
        raise AttemptsExhausted(
            f"{record.type} task failed on {record.attempts} peer(s): " + "; ".join(refusals),
            refusals,
        )

    def cards_pending(self) -> list[str]:
        """Room members we cannot judge yet: not linked yet, or linked without a card.

        A peer whose link went down is not pending: nothing is on its way from it (if it
        comes back, its new link and card wake the waiters).
        """
        connected = set(self.node.connected_peers())
        pending = []
        for peer in self.node.transport.room_members():
            view = self.node.peer(peer)
            if view is None or view.state is PeerState.CONNECTING:
                pending.append(peer)
            elif peer in connected and view.card is None:
                pending.append(peer)
        return pending

    async def _wait_for_cards(self, record: TaskRecord, deadline: float) -> bool:
        """Wait (bounded) while a peer that may be capable has not sent its card.

        True when something changed and the caller should choose again; False when
        nothing is pending or the wait is over (then no capable peer is the answer).
        """
        limit = min(deadline, record.submitted_mono + self.settings.card_wait_s)
        if not self.cards_pending() or time.monotonic() >= limit:
            return False
        record.waiting = "a capable peer's agent card"
        self.notify("task:waiting", record.as_dict())
        try:
            return await self._wait_for_capacity(limit)
        finally:
            record.waiting = None

    def _check_named_peer(self, peer: str, specs: Mapping[str, SpecifierSet]) -> None:
        view = self.node.peer(peer)
        report = view.card.environment if view is not None and view.card is not None else {}
        missing = unmet(report, specs)
        if missing:
            raise NoCapablePeerError(
                Reason.UNMET_REQUIREMENT,
                f"peer {peer[:16]} does not meet requires: " + ", ".join(missing),
            )

    def _choose(
        self,
        requirements: list[str],
        tried: list[str],
        specs: Mapping[str, SpecifierSet] | None = None,
        prefer: Collection[str] = (),
    ) -> tuple[str | None, bool]:
        """(peer with room, whether any capable untried peer exists at all)."""
        candidates = [
            c
            for c in self.node.candidates()
            if c.peer_id not in tried and not (specs and unmet(c.versions, specs))
        ]
        capable = [c for c in candidates if set(requirements) <= c.capabilities]
        chosen = choose_peer(
            [c for c in capable if not c.full], requirements, rng=self._rng, prefer=prefer
        )
        return (chosen.peer_id if chosen else None), bool(capable)

    def _no_peer_error(
        self,
        task_type: str,
        requirements: list[str],
        refusals: list[str],
        specs: Mapping[str, SpecifierSet] | None = None,
    ) -> DelegationError:
        if refusals:
            return AttemptsExhausted(
                f"no capable peer accepted the {task_type} task: " + "; ".join(refusals),
                refusals,
            )
        capable = [
            v
            for v in self.node.peers()
            if v.state is PeerState.CONNECTED
            and v.card
            and set(requirements) <= set(v.capabilities)
        ]
        if specs and capable:
            wanted = ", ".join(f"{name}{spec}" for name, spec in specs.items())
            have = "; ".join(
                f"{v.card.name} ({v.peer_id[:16]}): {', '.join(unmet(v.card.environment, specs))}"
                for v in capable
                if v.card is not None
            )
            return NoCapablePeerError(
                Reason.UNMET_REQUIREMENT,
                f"no connected peer offering {', '.join(requirements)} has {wanted}: {have}",
            )
        seen = [
            f"{_label(v)} ({', '.join(v.capabilities) or 'no capabilities'})"
            for v in self.node.peers()
            if v.state is PeerState.CONNECTED
        ]
        detail = "; connected peers: " + ", ".join(seen) if seen else "; no peers are connected"
        return NoCapablePeerError(
            Reason.NO_CAPABLE_PEER,
            f"no connected peer offers {', '.join(requirements)} (needed for {task_type}){detail}",
        )

    async def _run_locally(self, record: TaskRecord, data: Any, timeout: float) -> dict[str, Any]:
        assert self._local_runner is not None
        record.peer = self.node.local_id
        record.attempts += 1
        record.state = TaskState.WORKING
        record.started_at = time.time()
        try:
            result: dict[str, Any] = await self._local_runner(record.id, record.type, data, timeout)
        except TaskRefused as exc:
            # Refused here exactly as a peer would refuse it: the same error as from a peer.
            raise TaskRefused(exc.reason, exc.message, self.node.local_id) from exc
        return result

    def _finish(
        self, record: TaskRecord, state: TaskState, error: str | None, *, sent: bool = True
    ) -> None:
        if record.done:
            return  # exactly once
        self.output.forget_watchers(record.id)
        record.state = state
        record.error = error
        record.finished_at = time.time()
        if record.started_at is None:
            record.started_at = record.finished_at if state is TaskState.COMPLETED else None
        if state is TaskState.COMPLETED:
            self.stats.tasks_completed += 1
        elif state is TaskState.CANCELED:
            self.stats.tasks_canceled += 1
        else:
            self.stats.tasks_failed += 1
            if not sent:
                self.stats.tasks_not_sent += 1
        self.stats.touch("task")
        self.notify(f"task:{state}", record.as_dict())
