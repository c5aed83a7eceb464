"""Who may ask this peer to run what (the owner's rules, checked before anything runs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm_notebook._util.ratelimit import TokenBuckets
from swarm_notebook.errors import TaskRefused
from swarm_notebook.reasons import Reason

MAX_TRACKED_PEERS = 10_000  # bounded: a forgotten peer only starts again with a full bucket


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
    _buckets: TokenBuckets | None = field(default=None, repr=False)

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
        if self._buckets is None:
            # Built on first use, so limits set after construction still apply.
            self._buckets = TokenBuckets(self.rate_per_s, self.burst, MAX_TRACKED_PEERS, self.clock)
        if not self._buckets.take(peer_id):
            raise TaskRefused(Reason.RATE_LIMITED, f"more than {self.rate_per_s:g} tasks/s")

    def allows_pickle(self, peer_id: str) -> bool:
        return peer_id in self.trusted_pickle_peers
