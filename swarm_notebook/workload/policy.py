"""Who may ask this peer to run what (the owner's rules, checked before anything runs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm_notebook.errors import TaskRefused
from swarm_notebook.reasons import Reason


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class TaskPolicy:
    """Default: any authenticated peer of the room (which proved the room secret to join)
    may send tasks the owner enabled, within per-peer rate and size limits.

    ``allowed_peers`` narrows that to named peer ids; ``per_type_peers`` narrows one task
    type (e.g. only colleagues may use ``python-computation``).
    """

    allowed_peers: frozenset[str] | None = None
    per_type_peers: dict[str, frozenset[str]] = field(default_factory=dict)
    max_input_bytes: int = 64 * 1024 * 1024
    # Accepted work is bounded by concurrency + queue; the rate only stops a peer that
    # floods us with requests, so it sits well above what pipelining reaches (~1-2k/s).
    rate_per_s: float = 5000.0
    burst: float = 10000.0
    trusted_pickle_peers: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict, repr=False)

    def check(self, peer_id: str, task_type: str, input_bytes: int) -> None:
        if self.allowed_peers is not None and peer_id not in self.allowed_peers:
            raise TaskRefused(
                Reason.NOT_ALLOWED, "this peer's owner does not accept tasks from you"
            )
        allowed_for_type = self.per_type_peers.get(task_type)
        if allowed_for_type is not None and peer_id not in allowed_for_type:
            raise TaskRefused(
                Reason.NOT_ALLOWED, f"{task_type} is not allowed from you on this peer"
            )
        if input_bytes > self.max_input_bytes:
            raise TaskRefused(
                Reason.TOO_LARGE, f"task input {input_bytes} bytes > limit {self.max_input_bytes}"
            )
        self._take_token(peer_id)

    def _take_token(self, peer_id: str) -> None:
        now = self.clock()
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._buckets.clear()  # bounded: forgetting old peers only refills them
            bucket = self._buckets[peer_id] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens < 1:
            raise TaskRefused(Reason.RATE_LIMITED, f"more than {self.rate_per_s:g} tasks/s")
        bucket.tokens -= 1

    def allows_pickle(self, peer_id: str) -> bool:
        return peer_id in self.trusted_pickle_peers
