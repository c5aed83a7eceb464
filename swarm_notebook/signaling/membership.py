"""The room as a client last knew it, with a grace period before a peer counts as gone.

A signaling outage (or a server restart) makes peers vanish and reappear within
seconds; reporting that as leave + join would tear down healthy peer links above. So a
peer missing after a re-join, or announced as left, stays a member for ``grace``
seconds and only then is reported as left — unless it reappears first, in which case
nothing is reported at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class MembershipChanges:
    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


class RoomMembership:
    """Pure state machine; the caller supplies the clock reading ``now`` on every call.

    >>> room = RoomMembership(grace=5.0)
    >>> room.rejoined(["b", "c"], now=0.0).joined
    ['b', 'c']
    >>> room.rejoined(["c"], now=1.0).left   # b may still come back
    []
    >>> room.peer_joined("b", now=2.0).joined  # it did: no event at all
    []
    >>> room.expire(now=100.0).left
    []
    """

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._members: set[str] = set()
        self._departing: dict[str, float] = {}  # peer id -> deadline

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def next_deadline(self) -> float | None:
        return min(self._departing.values(), default=None)

    def rejoined(self, peers: Iterable[str], now: float) -> MembershipChanges:
        """Reconcile with the member list the server sent on (re-)join."""
        present = set(peers)
        changes = MembershipChanges()
        for peer in sorted(self._members - present):
            self._departing.setdefault(peer, now + self._grace)
        for peer in sorted(present):
            changes.joined.extend(self._arrive(peer))
        changes.left.extend(self.expire(now).left)
        return changes

    def peer_joined(self, peer: str, now: float) -> MembershipChanges:
        return MembershipChanges(joined=self._arrive(peer), left=self.expire(now).left)

    def peer_left(self, peer: str, now: float) -> MembershipChanges:
        if peer in self._members:
            self._departing.setdefault(peer, now + self._grace)
        return self.expire(now)

    def expire(self, now: float) -> MembershipChanges:
        """Report peers whose grace has run out as left."""
        gone = sorted(p for p, deadline in self._departing.items() if deadline <= now)
        for peer in gone:
            del self._departing[peer]
            self._members.discard(peer)
        return MembershipChanges(left=gone)

    def _arrive(self, peer: str) -> list[str]:
        if self._departing.pop(peer, None) is not None or peer in self._members:
            return []
        self._members.add(peer)
        return [peer]
