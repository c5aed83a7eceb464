"""The serving side: run tasks peers delegate to us, under the owner's policy, within bounds.

Refusals carry a reason code (policy, capacity, shutdown). Load is reported as it
changes, and on shutdown unfinished tasks are handed back so the delegator retries them.
Every task runs through ``run_executor``: an executor that crashes is refused with
``internal-error`` (counted, logged with its traceback) and the delegator retries it on
another peer; input the executor refuses is refused with the executor's reason; a
failure of the user's own work is a result, and is not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from swarm_notebook._util.slots import Slots
from swarm_notebook.errors import (
    DelegationError,
    HandlerRefusal,
    NoCapablePeerError,
    RefError,
    TaskRefused,
)
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.protocol import oob
from swarm_notebook.protocol.compression import DEFAULT_CODEC, Compression
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import (
    Executor,
    ResidentInput,
    TaskContext,
    run_executor,
    takes_resident_inputs,
)
from swarm_notebook.workload.messages import (
    REQUIREMENTS,
    TASK_EXECUTION,
    TASK_OUTPUT,
    TASK_STATUS,
    TaskOutput,
    TaskRequest,
    TaskStatus,
)
from swarm_notebook.workload.output import DEFAULT_INTERVAL_S, DEFAULT_MAX_BYTES, OutputRelay
from swarm_notebook.workload.policy import TaskPolicy
from swarm_notebook.workload.records import TaskLog, TaskRecord, TaskState
from swarm_notebook.workload.ref_service import RefService

log = logging.getLogger(__name__)

_SIZE_ENCODER = msgspec.msgpack.Encoder()
# How long a task may run before the delegator is told it is working: most tasks answer
# sooner, and their result is the only message back.
WORKING_NOTICE_DELAY_S = 0.05

Notify = Callable[[str, dict[str, Any]], None]


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
        output_interval_s: float = DEFAULT_INTERVAL_S,
        max_output_bytes: int = DEFAULT_MAX_BYTES,
        codec: str | None = DEFAULT_CODEC,
        refs: RefService | None = None,
    ) -> None:
        self.node = node
        self.codec = codec
        self.executors = executors
        self.policy = policy
        self.tasks = tasks
        self.stats = stats
        self.notify = notify
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.audit = audit
        self.output_interval_s = output_interval_s
        self.max_output_bytes = max_output_bytes
        self.output_counters = {"messages": 0, "truncated_bytes": 0, "undelivered": 0}
        self._slots = Slots(concurrency)
        # Work the backend runs besides ours (a shared Dask cluster): counted as load.
        self.occupancy: Callable[[], int] | None = None
        self._slots_used = 0  # tasks running plus open sessions: what the load reports
        self._in_flight = 0
        self._queued = 0
        self._draining = False
        self._running: set[asyncio.Future[dict[str, Any]]] = set()
        self._status_tasks: set[asyncio.Future[Any]] = set()
        self._notices: set[asyncio.TimerHandle] = set()
        self.refusals: dict[str, int] = {}
        self.refs = refs
        node.endpoint.register_message_handler(TASK_EXECUTION, self._on_task, schema=TaskRequest)

    @property
    def capabilities(self) -> set[str]:
        return set(self.node.capabilities)

    def _refuse(
        self, peer_id: str, request: TaskRequest, reason: Reason | str, message: str
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
            raise self._refuse(
                peer_id, request, Reason.WORKER_SHUTDOWN, "this worker is shutting down"
            )
        if request.type not in REQUIREMENTS:
            raise self._refuse(
                peer_id, request, Reason.UNKNOWN_TASK_TYPE, f"unknown task type {request.type!r}"
            )
        executor = self.executors.get(request.type)
        if executor is None or not set(REQUIREMENTS[request.type]) <= self.capabilities:
            raise self._refuse(
                peer_id,
                request,
                Reason.CAPABILITY_MISSING,
                f"this peer does not offer {', '.join(REQUIREMENTS[request.type])}",
            )
        try:
            # Sized without encoding the large binaries again (a 50 MB frame was copied
            # here just to be measured).
            size = oob.size(oob.encode(request.data, _SIZE_ENCODER))
            self.policy.check(peer_id, request.type, size)
        except TaskRefused as exc:
            raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
        if self._slots_used + self._queued >= self.concurrency + self.max_queue:
            raise self._refuse(peer_id, request, Reason.BUSY, "queue full; try another peer")
        keep: list[str] = []
        resident: dict[str, ResidentInput] = {}
        if self.refs is not None:
            # Resident inputs are resolved after the size policy: refs are what keep big
            # data off the wire, so they do not count against max_input_bytes.
            try:
                data, keep, resident = self.refs.resolve(peer_id, request.data)
                if not takes_resident_inputs(executor):
                    data = self.refs.merge_inputs(data, resident)
                    resident = {}
            except HandlerRefusal as exc:
                raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
            except RefError as exc:  # a ref released or damaged while being read
                raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
            request = TaskRequest(request.task_id, request.type, data, request.timeout)
        return await self._serve(peer_id, request, executor, keep, resident)

    async def _serve(
        self,
        peer_id: str,
        request: TaskRequest,
        executor: Executor,
        keep: list[str] | None = None,
        resident: dict[str, ResidentInput] | None = None,
    ) -> dict[str, Any]:
        record = self.tasks.add(
            TaskRecord(id=request.task_id, type=request.type, role="served", peer=peer_id)
        )
        self._queued += 1
        self._report()
        arrived = time.monotonic()
        has_slot = False
        session_op = _session_op(request)
        # A session holds one slot from open to end; what runs in it uses that slot.
        own_slot = session_op not in ("run", "close")
        holder = _SessionSlot(self._give_back_slot) if session_op == "open" else None
        try:
            if own_slot:
                await self._slots.acquire()
                self._slots_used += 1
            has_slot = True
            try:
                self._queued -= 1
                self._in_flight += 1
                self._report()
                record.state = TaskState.WORKING
                record.started_at = time.time()
                # A task that answers soon needs no separate "working" message: its
                # result says it all, and its round trip crosses one message less.
                notice = asyncio.get_running_loop().call_later(
                    WORKING_NOTICE_DELAY_S, self._tell_working, peer_id, request.task_id
                )
                self._notices.add(notice)
                relay = self._relay(peer_id, request.task_id)
                ctx = TaskContext(
                    task_id=request.task_id,
                    delegator=peer_id,
                    # Time spent waiting for a slot counts against the task's budget.
                    timeout_s=_remaining(request.timeout, arrived),
                    allow_pickle=self.policy.allows_pickle(peer_id),
                    on_output=relay.push,
                    on_session_end=holder.ended if holder is not None else None,
                    compression=Compression(
                        self.node.transport.link_throughput(peer_id), codec=self.codec
                    ),
                    resident_inputs=resident or {},
                )
                run = asyncio.ensure_future(self._run(executor, request, ctx))
                self._running.add(run)
                try:
                    result = await run
                    if keep and self.refs is not None:
                        result = self.refs.keep_outputs(peer_id, result, keep)
                    # Output first: the delegator reads the result after the last batch.
                    await relay.close()
                except BaseException:
                    relay.abort()
                    raise
                finally:
                    notice.cancel()
                    self._notices.discard(notice)
                    self._count_output(relay)
                    self._running.discard(run)
                    self._in_flight -= 1
                if holder is not None and result.get("success") and not result.get("reopened"):
                    holder.keep()
            finally:
                if own_slot and not (holder is not None and holder.kept):
                    self._give_back_slot()
        except HandlerRefusal as exc:
            # Our executor crashed: not the delegator's fault, so refuse and let it retry.
            self._end(record, TaskState.FAILED, f"{exc.reason}: {exc.message}")
            raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
        except asyncio.CancelledError:
            self._end(record, TaskState.CANCELED, "canceled")
            if self._draining:
                # Handed back: the delegator retries it on another peer.
                raise self._refuse(
                    peer_id,
                    request,
                    Reason.WORKER_SHUTDOWN,
                    "worker shut down before the task finished",
                ) from None
            raise
        except TaskRefused as exc:
            # The executor refused the input before running it: a refusal on the wire, like
            # the policy's, so the delegator retries or stops by the reason.
            self._end(record, TaskState.REJECTED, exc.message)
            raise self._refuse(peer_id, request, exc.reason, exc.message) from exc
        finally:
            if not has_slot:
                self._queued -= 1
            self._report()
        success = bool(result.get("success"))
        record.backend_attempts = _backend_attempts(result)
        state = TaskState.COMPLETED if success else TaskState.FAILED
        self._end(record, state, None if success else result.get("error"))
        self.stats.tasks_served += 1
        self.audit(
            "delegation-received",
            peer=peer_id,
            outcome=state,
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
        return await run_executor(executor, data, ctx)

    def _relay(self, peer_id: str, task_id: str) -> OutputRelay:
        async def send(message: TaskOutput) -> None:
            await self.node.endpoint.send(peer_id, TASK_OUTPUT, msgspec.to_builtins(message))

        return OutputRelay(
            send, task_id, interval_s=self.output_interval_s, max_bytes=self.max_output_bytes
        )

    def _count_output(self, relay: OutputRelay) -> None:
        self.output_counters["messages"] += relay.messages_sent
        self.output_counters["truncated_bytes"] += relay.dropped
        self.output_counters["undelivered"] += relay.send_failures

    def _tell_working(self, peer_id: str, task_id: str) -> None:
        body = msgspec.to_builtins(TaskStatus(task_id=task_id, state=TaskState.WORKING))
        send = self.node.endpoint.send(peer_id, TASK_STATUS, body)
        task = asyncio.ensure_future(send)
        self._status_tasks.add(task)
        task.add_done_callback(self._status_sent)

    def _status_sent(self, task: asyncio.Future[Any]) -> None:
        self._status_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("task status not delivered: %s", task.exception())

    def _end(self, record: TaskRecord, state: TaskState, error: str | None) -> None:
        if record.done:
            return
        record.state = state
        record.error = error
        record.finished_at = time.time()

    def _report(self) -> None:
        busy = self._slots_used
        if self.occupancy is not None:
            busy = max(busy, min(self.occupancy(), self.concurrency))
        self.node.report_load(busy, self._queued)

    def set_concurrency(self, concurrency: int) -> None:
        """Run up to ``concurrency`` tasks at once from now on (a backend that scaled)."""
        self.concurrency = max(1, concurrency)
        self._slots.resize(self.concurrency)
        self._report()

    def refresh_load(self) -> None:
        """Report the load again (the backend's occupancy changed)."""
        self._report()

    def _give_back_slot(self) -> None:
        self._slots_used -= 1
        self._slots.release()
        self._report()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run_local(
        self, task_id: str, task_type: str, data: Any, timeout: float
    ) -> dict[str, Any]:
        """Run one of our own tasks here (the opt-in fallback when no peer can).

        A crash of the executor raises ``DelegationError`` with reason ``internal-error``:
        there is no other peer to retry on.
        """
        executor = self.executors.get(task_type)
        if executor is None:
            raise NoCapablePeerError(
                Reason.NO_CAPABLE_PEER, f"no peer, not even this one, can run {task_type}"
            )
        ctx = TaskContext(
            task_id=task_id, delegator=self.node.local_id, timeout_s=timeout, allow_pickle=True
        )
        request = TaskRequest(task_id=task_id, type=task_type, data=data, timeout=timeout)
        try:
            return await self._run(executor, request, ctx)
        except HandlerRefusal as exc:
            self.refusals[exc.reason] = self.refusals.get(exc.reason, 0) + 1
            raise DelegationError(exc.reason, exc.message) from exc

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
        """Cancel what is still running; the executors belong to the coordinator, which
        closes them."""
        for notice in self._notices:
            notice.cancel()
        for task in [*self._running, *self._status_tasks]:
            task.cancel()


class _SessionSlot:
    """The slot of a session being opened: kept once it opened, given back when it ends.

    The session can end (its child died) before its open task has returned; then the
    slot is given back by the task as usual, never twice.
    """

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self.kept = False
        self._ended = False

    def keep(self) -> None:
        if not self._ended:
            self.kept = True

    def ended(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.kept:
            self._give_back()


def _session_op(request: TaskRequest) -> str | None:
    """``open`` / ``run`` / ``close`` for a task in a session, None for any other task."""
    data = request.data
    if request.type != "python-computation" or not isinstance(data, dict):
        return None
    if not data.get("session"):
        return None
    op = data.get("session_op", "run")
    return op if op in ("open", "run", "close") else "invalid"


def _backend_attempts(result: dict[str, Any]) -> int | None:
    """How many times the backend ran the task (a Dask retry after a lost worker)."""
    attempts = result.get("backend_attempts")
    return attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None


def _remaining(budget: float | None, since: float) -> float | None:
    if budget is None:
        return None
    return max(budget - (time.monotonic() - since), 0.0)
