"""The Dask cluster behind a Dask-backed worker: its client, its size and how busy it is.

``DaskCluster("tcp://scheduler:8786")`` connects to a running scheduler;
``DaskCluster("local:2")`` starts a ``LocalCluster`` of two worker processes (one thread
each) owned by this peer, for trying it out. Either way the peer holds one asynchronous
``distributed.Client`` on the loop that serves the swarm.

What the swarm needs to know about the cluster is kept current here:

* ``nthreads``, the cluster's total threads: the capacity the agent card advertises. It
  is re-read as soon as the scheduler reports a worker added or removed (its ``all``
  event topic), and on every occupancy poll, so scaling shows on the card at once.
* ``occupancy``, how many tasks the cluster is running (for anyone, not only us), polled
  every ``poll_interval_s``: the load this peer reports.
* which of our tasks' keys were being processed on a worker that was lost: Dask runs them
  again elsewhere, and the task record reports the attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import UsageError
from swarm_notebook.reasons import Reason

log = logging.getLogger(__name__)

_LOCAL = re.compile(r"^local:(\d{1,3})$")
MAX_LOCAL_WORKERS = 64
OUTPUT_TOPIC = "swarm-notebook-output"  # live output of running tasks, from Dask workers

EventHandler = Callable[[dict[str, Any]], None]


def parse_dask_address(address: str) -> tuple[str | None, int]:
    """``(scheduler address, 0)`` or ``(None, n)`` for ``local:n``; ``UsageError`` if
    it is neither.

    >>> parse_dask_address("local:2")
    (None, 2)
    >>> parse_dask_address("tcp://10.0.0.5:8786")
    ('tcp://10.0.0.5:8786', 0)
    """
    match = _LOCAL.match(address.strip())
    if match:
        n = int(match.group(1))
        if not 1 <= n <= MAX_LOCAL_WORKERS:
            raise UsageError(
                Reason.BAD_ARGUMENTS, f"local:N needs 1 <= N <= {MAX_LOCAL_WORKERS}, got {n}"
            )
        return None, n
    if re.match(r"^(tcp|tls|ucx|inproc|ws|wss)://\S+$", address.strip()):
        return address.strip(), 0
    raise UsageError(
        Reason.BAD_ARGUMENTS,
        f"--dask {address!r:.80} is neither a scheduler address (tcp://HOST:8786) nor local:N",
    )


class DaskCluster:
    """One ``distributed.Client`` (and, for ``local:N``, its ``LocalCluster``)."""

    def __init__(self, address: str, *, poll_interval_s: float = 0.5) -> None:
        self.address = address
        self.scheduler_address, self.local_workers = parse_dask_address(address)
        self.poll_interval_s = poll_interval_s
        self.client: Any = None  # distributed.Client, asynchronous
        self._cluster: Any = None  # distributed.LocalCluster when local:N
        self.nthreads = 0
        self.occupancy = 0
        self.workers = 0
        self.workers_lost = 0
        self._listeners: list[Callable[[], None]] = []
        self._output_handlers: dict[str, EventHandler] = {}
        self._tracked: Counter[str] = Counter()  # key -> times its worker was lost
        self._tasks = OwnedTasks("dask-cluster")
        self._start_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        return self.client is not None

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when ``nthreads`` or ``occupancy`` changes."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Connect (or start the local cluster); idempotent."""
        async with self._start_lock:
            if self.client is not None:
                return
            from distributed import Client, LocalCluster

            if self.scheduler_address is None:
                self._cluster = await LocalCluster(
                    n_workers=self.local_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    asynchronous=True,
                )
                target: Any = self._cluster
            else:
                target = self.scheduler_address
            try:
                self.client = await Client(target, asynchronous=True)
            except BaseException:
                if self._cluster is not None:
                    await self._cluster.close()
                    self._cluster = None
                raise
            self.client.subscribe_topic("all", self._on_scheduler_event)
            self.client.subscribe_topic(OUTPUT_TOPIC, self._on_output_event)
            await self.refresh()
            self._tasks.spawn(self._poll(), name="dask-occupancy")

    async def close(self) -> None:
        """Close the client and the local cluster we started (never a remote one)."""
        self._closed = True
        await self._tasks.close()
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                # Unsubscribed first: the scheduler would send our own removal to the
                # closed comm (and log it as critical).
                for topic in ("all", OUTPUT_TOPIC):
                    client.unsubscribe_topic(topic)
                await client.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            await cluster.close()

    def stats(self) -> dict[str, Any]:
        """What ``get_stats()`` shows of the cluster."""
        return {
            "address": self.address,
            "scheduler": self.scheduler_address_now(),
            "workers": self.workers,
            "nthreads": self.nthreads,
            "occupancy": self.occupancy,
            "workers_lost": self.workers_lost,
        }

    def scheduler_address_now(self) -> str | None:
        if self.client is None:
            return self.scheduler_address
        return str(self.client.scheduler.address)

    async def worker_pids(self) -> dict[str, int]:
        """The process id of every Dask worker, by worker address."""
        assert self.client is not None
        pids = await self.client.run(os.getpid)
        return {str(k): int(v) for k, v in pids.items()}

    # -- live state ------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read threads and occupancy from the scheduler; tell listeners if changed."""
        client = self.client
        if client is None:
            return
        async with self._refresh_lock:
            nthreads = await client.nthreads()
            processing = await client.processing()
        total = sum(int(n) for n in nthreads.values())
        busy = sum(len(keys) for keys in processing.values())
        changed = (total, busy, len(nthreads)) != (self.nthreads, self.occupancy, self.workers)
        self.nthreads, self.occupancy, self.workers = total, busy, len(nthreads)
        if changed:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    log.exception("dask cluster listener failed")

    async def _poll(self) -> None:
        # Occupancy has no event of its own: read it at a steady, cheap pace.
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except (TimeoutError, OSError) as exc:
                log.warning("dask scheduler did not answer: %s", exc)

    def _on_scheduler_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else None
        if not isinstance(msg, dict):
            return
        action = msg.get("action")
        if action == "remove-worker":
            self.workers_lost += 0 if msg.get("expected") else 1
            for key in msg.get("processing-tasks") or ():
                if str(key) in self._tracked:
                    self._tracked[str(key)] += 1
        if action in ("add-worker", "remove-worker") and not self._closed:
            self._tasks.spawn(self.refresh(), name="dask-refresh")

    # -- our tasks -------------------------------------------------------------------

    def track(self, keys: list[str]) -> None:
        """Count lost workers under ``keys`` from now on (until ``untrack``)."""
        for key in keys:
            self._tracked.setdefault(key, 0)

    def untrack(self, keys: list[str]) -> int:
        """Stop tracking ``keys``; the most times one of them lost its worker."""
        lost = [self._tracked.pop(key, 0) for key in keys]
        return max(lost, default=0)

    def watch_output(self, task_key: str, handler: EventHandler) -> Callable[[], None]:
        """Send output events of ``task_key`` to ``handler``; returns the unsubscribe."""
        self._output_handlers[task_key] = handler

        def stop() -> None:
            self._output_handlers.pop(task_key, None)

        return stop

    def _on_output_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple | list) and len(event) == 2 else None
        if not isinstance(msg, dict):
            return
        handler = self._output_handlers.get(str(msg.get("task")))
        if handler is not None:
            handler(msg)
