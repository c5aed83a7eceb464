"""Sharing workload: sending tasks to the best peer, and serving tasks peers send us.

The delegating side picks the capable peer with the lowest load, retries on another when
a peer dies, times out or refuses, and reports each task exactly once. The serving side
checks the owner's policy, queues within bounds, reports its load, and on shutdown hands
unfinished work back so the delegator can run it elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from swarm_notebook.coordinator.executors.base import Executor, TaskContext, TaskRejected
from swarm_notebook.coordinator.executors.capabilities import REQUIREMENTS
from swarm_notebook.coordinator.policy import PolicyRefusal, TaskPolicy
from swarm_notebook.coordinator.records import CoordinationStats, TaskLog, TaskRecord
from swarm_notebook.protocol.envelope import ProtocolError
from swarm_notebook.swarm.agent_card import LoadReport
from swarm_notebook.swarm.node import SwarmNode
from swarm_notebook.swarm.routing import choose_peer
from swarm_notebook.transport.base import PeerUnavailable
from swarm_notebook.transport.endpoint import HandlerRefusal, RemoteError, RequestTimeout

log = logging.getLogger(__name__)

TASK_EXECUTION = "task-execution"
TASK_STATUS = "task-status"

# Refusals that pass with time: the task waits for room instead of using up an attempt.
TEMPORARY_REFUSALS = frozenset({"busy", "rate-limited"})
# Refusals that would be the same on every peer: retrying elsewhere cannot help.
FINAL_REFUSALS = frozenset({"bad-input", "wrong-schema", "too-large", "unknown-task-type"})


class DelegationError(Exception):
    """A task could not be delegated; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def requirements_for_task_type(task_type: str) -> list[str]:
    """Capabilities a peer needs to run ``task_type``.

    >>> requirements_for_task_type("python-computation")
    ['python-execution']
    """
    try:
        return list(REQUIREMENTS[task_type])
    except KeyError:
        known = ", ".join(sorted(REQUIREMENTS))
        raise DelegationError(
            "unknown-task-type", f"unknown task type {task_type!r}; known types: {known}"
        ) from None


class TaskRequest(msgspec.Struct):
    task_id: str
    type: str
    data: Any
    timeout: float | None = None


class TaskStatus(msgspec.Struct):
    task_id: str
    state: str


@dataclass
class DelegationSettings:
    max_attempts: int = 3
    default_timeout_s: float = 60.0
    reply_grace_s: float = 10.0
    run_locally_when_alone: bool = False


Notify = Callable[[str, dict[str, Any]], None]


class Delegator:
    """The delegating side of ``delegate_task``."""

    def __init__(
        self,
        node: SwarmNode,
        tasks: TaskLog,
        stats: CoordinationStats,
        notify: Notify,
        settings: DelegationSettings,
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
        node.endpoint.register_message_handler(TASK_STATUS, self._on_status, schema=TaskStatus)
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
        if status.state == "working" and record.state == "submitted":
            record.state = "working"
            record.started_at = time.time()
            self.notify("task:working", record.as_dict())

    async def delegate(
        self, task_type: str, data: Any, *, timeout: float | None = None, peer: str | None = None
    ) -> tuple[TaskRecord, dict[str, Any]]:
        requirements = requirements_for_task_type(task_type)
        timeout = self.settings.default_timeout_s if timeout is None else timeout
        record = self.tasks.add(TaskRecord(id=uuid.uuid4().hex, type=task_type, role="delegated"))
        self.stats.total_tasks += 1
        self.stats.touch("task")
        self.notify("task:submitted", record.as_dict())
        try:
            result = await self._attempts(record, requirements, data, timeout, peer)
        except asyncio.CancelledError:
            self._finish(record, "canceled", "canceled by the caller")
            raise
        except DelegationError as exc:
            self._finish(record, "rejected" if exc.reason != "timeout" else "failed", str(exc))
            raise
        except Exception as exc:
            # Whatever went wrong, the task still ends exactly once, and says why.
            self._finish(record, "failed", f"{type(exc).__name__}: {exc}")
            raise
        success = bool(result.get("success"))
        self._finish(
            record, "completed" if success else "failed", None if success else result.get("error")
        )
        return record, result

    async def _attempts(
        self,
        record: TaskRecord,
        requirements: list[str],
        data: Any,
        timeout: float,
        peer: str | None,
    ) -> dict[str, Any]:
        refusals: list[str] = []
        attempts = 1 if peer is not None else self.settings.max_attempts
        # Waiting for a free slot counts against the task's timeout, like a queue would.
        deadline = time.monotonic() + timeout
        backoff = 0.0
        while record.attempts < attempts:
            target = peer
            if target is None:
                candidate, capable = self._choose(requirements, record.tried_peers)
                if candidate is None and capable:
                    # Every capable peer is at its advertised capacity: wait, do not fail.
                    if await self._wait_for_capacity(deadline):
                        continue
                    raise DelegationError(
                        "timeout", f"no capable peer had room for the task within {timeout:g} s"
                    )
                if candidate is None:
                    if self._local_runner is not None and self.settings.run_locally_when_alone:
                        return await self._run_locally(record, data, timeout)
                    raise self._no_peer_error(record.type, requirements, refusals)
                target = candidate
            record.peer = target
            record.attempts += 1
            record.state = "submitted"
            view = self.node.peer(target)
            if view is not None:
                view.outstanding += 1
            request = TaskRequest(task_id=record.id, type=record.type, data=data, timeout=timeout)
            try:
                reply = await self.node.endpoint.request_detailed(
                    target,
                    TASK_EXECUTION,
                    msgspec.structs.asdict(request),  # bytes stay bytes (to_builtins base64s them)
                    timeout=timeout + self.settings.reply_grace_s,
                )
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
                    raise DelegationError(
                        exc.reason, f"peer refused the task: {exc.message}"
                    ) from exc
                continue
            except ProtocolError as exc:
                # Our own request broke a protocol limit (e.g. too large): no peer can help.
                raise DelegationError(
                    "too-large" if exc.reason == "oversized" else exc.reason,
                    f"the task could not be sent: {exc}",
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
        raise DelegationError(
            "attempts-exhausted",
            f"{record.type} task failed on {record.attempts} peer(s): " + "; ".join(refusals),
        )

    def _choose(self, requirements: list[str], tried: list[str]) -> tuple[str | None, bool]:
        """(peer with room, whether any capable untried peer exists at all)."""
        candidates = [c for c in self.node.candidates() if c.peer_id not in tried]
        capable = [c for c in candidates if set(requirements) <= c.capabilities]
        chosen = choose_peer([c for c in capable if not c.full], requirements, rng=self._rng)
        return (chosen.peer_id if chosen else None), bool(capable)

    def _no_peer_error(
        self, task_type: str, requirements: list[str], refusals: list[str]
    ) -> DelegationError:
        if refusals:
            return DelegationError(
                "attempts-exhausted",
                f"no capable peer accepted the {task_type} task: " + "; ".join(refusals),
            )
        seen = [
            f"{v.peer_id[:16]} ({', '.join(v.capabilities) or 'no capabilities'})"
            for v in self.node.peers()
            if v.state == "connected"
        ]
        detail = "; connected peers: " + ", ".join(seen) if seen else "; no peers are connected"
        return DelegationError(
            "no-capable-peer",
            f"no connected peer offers {', '.join(requirements)} (needed for {task_type}){detail}",
        )

    async def _run_locally(self, record: TaskRecord, data: Any, timeout: float) -> dict[str, Any]:
        assert self._local_runner is not None
        record.peer = self.node.local_id
        record.attempts += 1
        record.state = "working"
        record.started_at = time.time()
        result: dict[str, Any] = await self._local_runner(record.id, record.type, data, timeout)
        return result

    def _finish(self, record: TaskRecord, state: str, error: str | None) -> None:
        if record.done:
            return  # exactly once
        record.state = state
        record.error = error
        record.finished_at = time.time()
        if record.started_at is None:
            record.started_at = record.finished_at if state == "completed" else None
        if state == "completed":
            self.stats.tasks_completed += 1
        elif state == "canceled":
            self.stats.tasks_canceled += 1
        else:
            self.stats.tasks_failed += 1
        self.stats.touch("task")
        self.notify(f"task:{state}", record.as_dict())


class TaskServer:
    """Runs tasks peers delegate to us, under the owner's policy and within bounds."""

    def __init__(
        self,
        node: SwarmNode,
        executors: dict[str, Executor],
        policy: TaskPolicy,
        tasks: TaskLog,
        stats: CoordinationStats,
        notify: Notify,
        *,
        concurrency: int,
        max_queue: int = 64,
        audit: Callable[..., object] = lambda *a, **k: None,
    ) -> None:
        self.node = node
        self.executors = executors
        self.policy = policy
        self.tasks = tasks
        self.stats = stats
        self.notify = notify
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.audit = audit
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight = 0
        self._queued = 0
        self._draining = False
        self._running: set[asyncio.Future[dict[str, Any]]] = set()
        self._status_tasks: set[asyncio.Future[Any]] = set()
        self.refusals: dict[str, int] = {}
        node.endpoint.register_message_handler(TASK_EXECUTION, self._on_task, schema=TaskRequest)

    @property
    def capabilities(self) -> set[str]:
        return set(self.node.capabilities)

    def _refuse(
        self, peer_id: str, request: TaskRequest, reason: str, message: str
    ) -> HandlerRefusal:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self.audit(
            "delegation-received",
            peer=peer_id,
            outcome="refused",
            detail={"task_id": request.task_id, "type": request.type, "reason": reason},
        )
        self.notify(
            "task:rejected",
            {"id": request.task_id, "type": request.type, "peer": peer_id, "reason": reason},
        )
        return HandlerRefusal(reason, message)

    async def _on_task(self, peer_id: str, request: TaskRequest) -> dict[str, Any]:
        if self._draining:
            raise self._refuse(peer_id, request, "worker-shutdown", "this worker is shutting down")
        if request.type not in REQUIREMENTS:
            raise self._refuse(
                peer_id, request, "unknown-task-type", f"unknown task type {request.type!r}"
            )
        executor = self.executors.get(request.type)
        if executor is None or not set(REQUIREMENTS[request.type]) <= self.capabilities:
            raise self._refuse(
                peer_id,
                request,
                "capability-missing",
                f"this peer does not offer {', '.join(REQUIREMENTS[request.type])}",
            )
        try:
            size = len(msgspec.msgpack.encode(request.data))
            self.policy.check(peer_id, request.type, size)
        except PolicyRefusal as exc:
            raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
        if self._in_flight + self._queued >= self.concurrency + self.max_queue:
            raise self._refuse(peer_id, request, "busy", "queue full; try another peer")
        return await self._serve(peer_id, request, executor)

    async def _serve(
        self, peer_id: str, request: TaskRequest, executor: Executor
    ) -> dict[str, Any]:
        record = self.tasks.add(
            TaskRecord(id=request.task_id, type=request.type, role="served", peer=peer_id)
        )
        self._queued += 1
        self._report()
        has_slot = False
        try:
            async with self._slots:
                has_slot = True
                self._queued -= 1
                self._in_flight += 1
                self._report()
                record.state = "working"
                record.started_at = time.time()
                self._tell_working(peer_id, request.task_id)
                ctx = TaskContext(
                    task_id=request.task_id,
                    delegator=peer_id,
                    timeout_s=request.timeout,
                    allow_pickle=self.policy.allows_pickle(peer_id),
                )
                run = asyncio.ensure_future(self._run(executor, request, ctx))
                self._running.add(run)
                try:
                    result = await run
                finally:
                    self._running.discard(run)
                    self._in_flight -= 1
        except asyncio.CancelledError:
            self._end(record, "canceled", "canceled")
            if self._draining:
                # Handed back: the delegator retries it on another peer.
                raise self._refuse(
                    peer_id, request, "worker-shutdown", "worker shut down before the task finished"
                ) from None
            raise
        finally:
            if not has_slot:
                self._queued -= 1
            self._report()
        success = bool(result.get("success"))
        self._end(
            record, "completed" if success else "failed", None if success else result.get("error")
        )
        self.stats.tasks_served += 1
        self.audit(
            "delegation-received",
            peer=peer_id,
            outcome="completed" if success else "failed",
            detail={
                "task_id": request.task_id,
                "type": request.type,
                "error_type": result.get("error_type"),
            },
        )
        return {**result, "task_id": request.task_id, "load": msgspec.to_builtins(self.node.load)}

    async def _run(
        self, executor: Executor, request: TaskRequest, ctx: TaskContext
    ) -> dict[str, Any]:
        data = request.data if isinstance(request.data, dict) else {}
        try:
            return await executor.run(data, ctx)
        except TaskRejected as exc:
            return {"success": False, "error": exc.message, "error_type": exc.reason}

    def _tell_working(self, peer_id: str, task_id: str) -> None:
        body = msgspec.to_builtins(TaskStatus(task_id=task_id, state="working"))
        send = self.node.endpoint.send(peer_id, TASK_STATUS, body)
        task = asyncio.ensure_future(send)
        self._status_tasks.add(task)
        task.add_done_callback(self._status_sent)

    def _status_sent(self, task: asyncio.Future[Any]) -> None:
        self._status_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("task status not delivered: %s", task.exception())

    def _end(self, record: TaskRecord, state: str, error: str | None) -> None:
        if record.done:
            return
        record.state = state
        record.error = error
        record.finished_at = time.time()

    def _report(self) -> None:
        self.node.report_load(self._in_flight, self._queued)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run_local(
        self, task_id: str, task_type: str, data: Any, timeout: float
    ) -> dict[str, Any]:
        """Run one of our own tasks here (the opt-in fallback when no peer can)."""
        executor = self.executors.get(task_type)
        if executor is None:
            raise DelegationError(
                "no-capable-peer", f"no peer, not even this one, can run {task_type}"
            )
        ctx = TaskContext(
            task_id=task_id, delegator=self.node.local_id, timeout_s=timeout, allow_pickle=True
        )
        request = TaskRequest(task_id=task_id, type=task_type, data=data, timeout=timeout)
        return await self._run(executor, request, ctx)

    async def drain(self, grace_s: float) -> int:
        """Stop taking tasks; let running ones finish for ``grace_s``, then hand the rest back.

        Returns how many tasks were handed back.
        """
        self._draining = True
        running = list(self._running)
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
            return len(pending)
        return 0

    async def close(self) -> None:
        for task in [*self._running, *self._status_tasks]:
            task.cancel()
        for executor in set(self.executors.values()):
            try:
                await executor.close()
            except Exception:
                log.exception("closing executor %s", executor.task_type)
