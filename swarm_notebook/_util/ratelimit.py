"""Token buckets: one bucket, and a bounded set of buckets keyed by peer.

Every rate limit in the package (signaling frames, task requests, shared reflections,
knowledge queries, proposals and ballots) is one of these.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Allow bursts up to ``capacity`` and a sustained ``rate`` of takes per second.

    ``take`` reads ``clock`` unless given ``now``; a clock that steps back refills nothing.

    >>> bucket = TokenBucket(rate=1.0, capacity=2, clock=lambda: 0.0)
    >>> bucket.take(), bucket.take(), bucket.take()
    (True, True, False)
    >>> bucket.take(now=1.0)
    True
    """

    __slots__ = ("_capacity", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(
        self,
        rate: float,
        capacity: float,
        clock: Callable[[], float] = time.monotonic,
        now: float | None = None,
    ) -> None:
        self._rate = rate
        self._capacity = float(capacity)
        self._clock = clock
        self._tokens = float(capacity)
        self._stamp = clock() if now is None else now

    def take(self, now: float | None = None) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if now is None:
            now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._stamp = max(self._stamp, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class TokenBuckets:
    """One ``TokenBucket`` per key; at most ``max_keys`` are tracked.

    The least recently used key is forgotten first (it then starts with a full bucket,
    which is no more than a new peer gets).

    >>> buckets = TokenBuckets(rate_per_s=1.0, burst=1, max_keys=2)
    >>> buckets.take("a", now=0.0), buckets.take("a", now=0.0), buckets.take("b", now=0.0)
    (True, False, True)
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_s > 0, burst >= 1 and max_keys >= 1 are required")
        self._rate = rate_per_s
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> bool:
        """Spend one token for ``key``; False when its bucket is empty."""
        if now is None:
            now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._clock, now=now)
        self._buckets[key] = bucket
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
