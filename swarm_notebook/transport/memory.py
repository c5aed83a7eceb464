"""An in-memory twin of the mesh transport, for unit tests and large simulations.

Same interface as ``MeshTransport``; messages are really encoded and decoded (so size
limits and schemas apply), delivered on the shared loop after a configurable latency, lost
with a configurable probability, and blocked by partitions. It never replaces real aiortc
peers as the proof of a network feature.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable

from swarm_notebook.errors import PeerUnavailable, ProtocolError
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.envelope import Envelope, decode_envelope, encode_envelope
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.base import (
    LinkState,
    PeerLinkInfo,
    RejectionCounter,
    Transport,
    TransportCallbacks,
)


class MemoryNetwork:
    """A room-scoped switchboard shared by ``MemoryTransport`` instances on one loop.

    >>> net = MemoryNetwork(latency_s=0.001, loss=0.0, seed=1)
    """

    def __init__(self, latency_s: float = 0.0, loss: float = 0.0, seed: int | None = None) -> None:
        self.latency_s = latency_s
        self.loss = loss
        self._random = random.Random(seed)
        self._rooms: dict[str, dict[str, MemoryTransport]] = {}
        self._group_of: dict[str, int] = {}
        self.delivered = 0
        self.dropped = 0

    def members(self, room: str) -> list[str]:
        return sorted(self._rooms.get(room, {}))

    def reachable(self, a: str, b: str) -> bool:
        return self._group_of.get(a, 0) == self._group_of.get(b, 0)

    def _join(self, room: str, transport: MemoryTransport) -> None:
        peers = self._rooms.setdefault(room, {})
        if transport.local_id in peers:
            raise ValueError(f"peer {transport.local_id[:16]} is already in room {room!r}")
        for other in peers.values():
            if self.reachable(other.local_id, transport.local_id):
                other._peer_up(transport.local_id)
                transport._peer_up(other.local_id)
        peers[transport.local_id] = transport

    def _leave(self, room: str, transport: MemoryTransport) -> None:
        peers = self._rooms.get(room, {})
        peers.pop(transport.local_id, None)
        for other in peers.values():
            other._peer_down(transport.local_id, "peer left")
        if not peers:
            self._rooms.pop(room, None)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: peers in different groups cannot reach each other."""
        before = {room: dict(peers) for room, peers in self._rooms.items()}
        self._group_of = {peer: index + 1 for index, group in enumerate(groups) for peer in group}
        self._reconcile(before)

    def heal(self) -> None:
        before = {room: dict(peers) for room, peers in self._rooms.items()}
        self._group_of = {}
        self._reconcile(before)

    def _reconcile(self, rooms: dict[str, dict[str, MemoryTransport]]) -> None:
        for peers in rooms.values():
            for transport in peers.values():
                for other in peers:
                    if other == transport.local_id:
                        continue
                    if self.reachable(transport.local_id, other):
                        transport._peer_up(other)
                    else:
                        transport._peer_down(other, "partitioned")

    def _deliver(self, room: str, src: str, dst: str, payload: bytes) -> None:
        if self.loss and self._random.random() < self.loss:
            self.dropped += 1
            return
        target = self._rooms.get(room, {}).get(dst)
        if target is None or not self.reachable(src, dst):
            self.dropped += 1
            return
        self.delivered += 1
        if self.latency_s > 0:
            asyncio.get_running_loop().call_later(self.latency_s, target._receive, src, payload)
        else:
            asyncio.get_running_loop().call_soon(target._receive, src, payload)


class MemoryTransport(Transport):
    def __init__(
        self,
        identity: Identity,
        network: MemoryNetwork,
        room: str,
        *,
        max_message_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        self.identity = identity
        self.local_id = identity.peer_id
        self.network = network
        self.room = room
        self.max_message_bytes = max_message_bytes
        self.callbacks = TransportCallbacks()
        self.rejections = RejectionCounter()
        self._connected: set[str] = set()
        self._started = False
        # Totals like the mesh's, so rate views work the same over the twin.
        self.counters = {"bytes_in": 0, "bytes_out": 0}

    async def start(self) -> None:
        self.network._join(self.room, self)
        self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            self.network._leave(self.room, self)
            self._connected.clear()

    def connected_peers(self) -> list[str]:
        return sorted(self._connected)

    def room_members(self) -> list[str]:
        return [p for p in self.network.members(self.room) if p != self.local_id]

    def stats(self) -> dict[str, object]:
        return {**super().stats(), **self.counters}

    def link_info(self) -> list[PeerLinkInfo]:
        return [
            PeerLinkInfo(
                peer_id=peer,
                state=LinkState.CONNECTED if peer in self._connected else LinkState.GONE,
                rtt_ms=2000 * self.network.latency_s if peer in self._connected else None,
            )
            for peer in self.room_members()
        ]

    async def send(self, peer_id: str, envelope: Envelope) -> int:
        if peer_id not in self._connected:
            raise PeerUnavailable(f"no link to peer {peer_id[:16]}")
        payload = encode_envelope(envelope)
        if len(payload) > self.max_message_bytes:
            raise ProtocolError(
                Reason.OVERSIZED, f"{len(payload)} bytes > limit {self.max_message_bytes}"
            )
        self.network._deliver(self.room, self.local_id, peer_id, payload)
        self.counters["bytes_out"] += len(payload)
        return len(payload)

    def _receive(self, src: str, payload: bytes) -> None:
        if src not in self._connected:
            self.rejections.count("unauthenticated")
            return
        self.counters["bytes_in"] += len(payload)
        try:
            env = decode_envelope(payload, max_size=self.max_message_bytes)
        except ProtocolError as exc:
            self.rejections.count(exc.reason)
            return
        if env.type.startswith("link."):
            self.rejections.count("unknown-link-message")
            return
        try:
            self.callbacks.on_message(src, env, len(payload))
        except Exception:
            self.rejections.count("internal-error")

    def _peer_up(self, peer_id: str) -> None:
        if peer_id not in self._connected:
            self._connected.add(peer_id)
            self.callbacks.on_peer_up(peer_id)

    def _peer_down(self, peer_id: str, reason: str) -> None:
        if peer_id in self._connected:
            self._connected.discard(peer_id)
            self.callbacks.on_peer_down(peer_id, reason)
