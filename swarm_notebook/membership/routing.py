"""Choosing the peer that runs a task."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    capabilities: frozenset[str]
    advertised_load: int  # in flight + queued, as the peer last reported
    local_outstanding: int  # tasks we sent it that have not answered yet
    concurrency: int
    capacity: int = 1 << 30  # most tasks it accepts at once (running + queued)
    versions: Mapping[str, str] = field(default_factory=dict)  # from its card

    @property
    def full(self) -> bool:
        return self.local_outstanding >= self.capacity


def load_score(c: Candidate) -> float:
    """Work per slot. Our own outstanding tasks are a floor: the peer's last report may
    predate them, and counting both would double-count the ones it already reported."""
    return max(c.advertised_load, c.local_outstanding) / max(1, c.concurrency)


def choose_peer(
    candidates: Iterable[Candidate],
    requirements: Sequence[str],
    *,
    exclude: Iterable[str] = (),
    rng: random.Random | None = None,
    prefer: Iterable[str] = (),
) -> Candidate | None:
    """The capable peer with the lowest load, random among ties; ``None`` if none fits.

    ``prefer`` is a locality hint (the peers holding a task's resident data): when one of
    them is capable, the choice is made among them only, so the data does not move.

    >>> a = Candidate("a", frozenset({"python-execution"}), 2, 0, 2)
    >>> b = Candidate("b", frozenset({"python-execution"}), 0, 1, 2)
    >>> choose_peer([a, b], ["python-execution"]).peer_id
    'b'
    >>> choose_peer([a, b], ["python-execution"], prefer=["a"]).peer_id
    'a'
    """
    skipped = set(exclude)
    needed = set(requirements)
    capable = [c for c in candidates if c.peer_id not in skipped and needed <= c.capabilities]
    if not capable:
        return None
    preferred = set(prefer)
    local = [c for c in capable if c.peer_id in preferred]
    if local:
        capable = local
    best = min(load_score(c) for c in capable)
    tied = [c for c in capable if load_score(c) == best]
    return (rng or random).choice(tied)
