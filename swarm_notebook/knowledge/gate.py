"""Admission of reflections shared by peers (the blueprint's ``reflection-share`` handler).

A received reflection must pass, in order: the sender's rate limit, schema and size limits, the
"only successful lessons are shared" rule, a freshness window, its author's signature
(and by default author == authenticated sender), and replay detection by content hash.
Each refusal raises ``ReflectionRejected`` and is counted by reason.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarm_notebook._util.ratelimit import TokenBuckets
from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.knowledge.reflections import (
    DEFAULT_LIMITS,
    SUCCESSFUL,
    Reflection,
    ReflectionLimits,
    content_hash,
    validate_reflection,
    verify_reflection,
)
from swarm_notebook.reasons import Reason


@dataclass(frozen=True)
class GateConfig:
    """Limits of the gate.

    ``max_age_s`` / ``max_future_s``: accepted window around ``now`` for the author's
    timestamp (clock skew is allowed for in ``max_future_s``). ``rate_per_s`` / ``burst``:
    per-sender token bucket. ``replay_memory``: content hashes remembered in memory
    (the store's own lookup, if given, covers older ones). ``require_author_is_sender``:
    refuse relayed reflections (author signed, but someone else forwarded it).
    """

    max_age_s: float = 24 * 3600.0
    max_future_s: float = 300.0
    rate_per_s: float = 1.0
    burst: float = 10.0
    tracked_senders: int = 1024
    replay_memory: int = 10_000
    require_author_is_sender: bool = True
    limits: ReflectionLimits = field(default_factory=lambda: DEFAULT_LIMITS)


class SharedReflectionGate:
    """Decides whether a reflection received from ``sender`` may be integrated.

    ``is_known`` (e.g. ``ReflectionStore.has_content_hash``) extends replay detection
    beyond the in-memory window and across restarts.

    >>> gate = SharedReflectionGate()
    >>> try:
    ...     gate.check("somebody", {"nonsense": 1}, now=0.0)
    ... except ReflectionRejected as exc:
    ...     print(exc.reason)
    wrong-schema
    """

    def __init__(
        self,
        config: GateConfig | None = None,
        *,
        is_known: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config or GateConfig()
        self._is_known = is_known
        self._buckets = TokenBuckets(
            self.config.rate_per_s, self.config.burst, self.config.tracked_senders
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._rejections: Counter[str] = Counter()
        self.accepted = 0

    @property
    def rejections(self) -> dict[str, int]:
        """Refusals so far, by reason."""
        return dict(self._rejections)

    def check(self, sender: str, obj: Any, now: float) -> Reflection:
        """Return the validated reflection or raise (and count) ``ReflectionRejected``."""
        try:
            reflection = self._admit(sender, obj, now)
        except ReflectionRejected as exc:
            self._rejections[exc.reason] += 1
            raise
        self.accepted += 1
        return reflection

    def _admit(self, sender: str, obj: Any, now: float) -> Reflection:
        cfg = self.config
        # Rate first: a flood must cost us as little as possible.
        if not self._buckets.take(sender, now):
            raise ReflectionRejected(
                Reason.RATE_LIMITED, f"more than {cfg.rate_per_s}/s (burst {cfg.burst}) from sender"
            )
        reflection = validate_reflection(obj, limits=cfg.limits)
        if reflection.outcome != SUCCESSFUL:
            raise ReflectionRejected(
                Reason.NOT_SUCCESSFUL,
                f"only successful reflections are shared, got {reflection.outcome!r}",
            )
        age = now - reflection.timestamp
        if age > cfg.max_age_s or -age > cfg.max_future_s:
            raise ReflectionRejected(
                Reason.STALE,
                f"timestamp is {age:.0f} s from now (window -{cfg.max_future_s:.0f}"
                f"..{cfg.max_age_s:.0f} s)",
            )
        if not verify_reflection(reflection):
            raise ReflectionRejected(Reason.BAD_SIGNATURE, "signature does not match the author")
        if cfg.require_author_is_sender and reflection.author != sender:
            raise ReflectionRejected(Reason.AUTHOR_MISMATCH, "author is not the sending peer")
        digest = content_hash(reflection)
        if digest in self._seen or (self._is_known is not None and self._is_known(digest)):
            raise ReflectionRejected(Reason.REPLAYED, f"content {digest[:16]} was already received")
        self._seen[digest] = None
        while len(self._seen) > cfg.replay_memory:
            self._seen.popitem(last=False)
        return reflection
