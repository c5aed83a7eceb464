"""Which socket holds which peer id in which room; rooms vanish when their last peer leaves."""

from __future__ import annotations

from typing import Generic, TypeVar

from swarm_notebook.reasons import Reason

Member = TypeVar("Member")


class RoomRegistry(Generic[Member]):
    """Rooms of peer ids, each bound to one member object (the server's connection).

    All methods are synchronous so a check and the bind that follows it cannot be
    interleaved with another join on the same event loop.
    """

    def __init__(self, *, max_rooms: int, peers_per_room: int) -> None:
        self._max_rooms = max_rooms
        self._peers_per_room = peers_per_room
        self._rooms: dict[str, dict[str, Member]] = {}

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    @property
    def peer_count(self) -> int:
        return sum(len(room) for room in self._rooms.values())

    def admission_refusal(self, room: str, peer_id: str) -> str | None:
        """The reason ``peer_id`` cannot join ``room`` now, or None if it can."""
        members = self._rooms.get(room)
        if members is None:
            return Reason.TOO_MANY_ROOMS if len(self._rooms) >= self._max_rooms else None
        if peer_id in members:  # a proven replacement does not grow the room
            return None
        return Reason.ROOM_FULL if len(members) >= self._peers_per_room else None

    def bind(self, room: str, peer_id: str, member: Member) -> Member | None:
        """Bind ``peer_id`` to ``member``; returns the member it replaced, if any."""
        members = self._rooms.setdefault(room, {})
        previous = members.get(peer_id)
        members[peer_id] = member
        return previous

    def unbind(self, room: str, peer_id: str, member: Member) -> bool:
        """Remove the binding if ``member`` still holds it (False once it was replaced)."""
        members = self._rooms.get(room)
        if members is None or members.get(peer_id) is not member:
            return False
        del members[peer_id]
        if not members:
            del self._rooms[room]
        return True

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    def lookup(self, room: str, peer_id: str) -> Member | None:
        return self._rooms.get(room, {}).get(peer_id)

    def others(self, room: str, peer_id: str) -> dict[str, Member]:
        return {pid: m for pid, m in self._rooms.get(room, {}).items() if pid != peer_id}
