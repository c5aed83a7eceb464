"""The interface every peer transport offers (aiortc mesh, in-memory twin)."""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from swarm_notebook.protocol.envelope import Envelope


class LinkState(StrEnum):
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    GONE = "gone"


@dataclass
class PeerLinkInfo:
    peer_id: str
    state: LinkState
    rtt_ms: float | None = None
    connected_since: float | None = None
    last_seen: float | None = None
    dials: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # The selected ICE candidate pair: types on each end ("host", "srflx", "relay"), the
    # link's route (the most indirect of the two) and the STUN/TURN server it went through.
    local_candidate: str | None = None
    remote_candidate: str | None = None
    route: str | None = None
    ice_server: str | None = None
    # The WebRTC library the peer's end of the link runs ("aiortc", "native"), from its hello.
    backend: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A peer refused a message we sent (too large, reassembly full, out of order...).

    ``message_id``/``message_type``/``reply_to`` describe *our* message, looked up from
    what we sent; the peer only names the transfer or id, never what we sent.
    """

    reason: str
    detail: str
    message_id: str | None = None
    message_type: str | None = None
    reply_to: str | None = None


MessageCallback = Callable[[str, Envelope, int], None]
"""(peer id, envelope, encoded size) — called on the transport's loop; must not block."""
PeerCallback = Callable[[str], None]
PeerDownCallback = Callable[[str, str], None]
RefusalCallback = Callable[[str, Refusal], None]


@dataclass
class TransportCallbacks:
    on_message: MessageCallback = lambda peer, env, size: None
    on_peer_up: PeerCallback = lambda peer: None
    on_peer_down: PeerDownCallback = lambda peer, reason: None
    on_refused: RefusalCallback = lambda peer, refusal: None
    # A link that never came up failed: (peer id, reason), e.g. the peer left the room.
    on_dial_failed: PeerDownCallback = lambda peer, reason: None


@dataclass
class RejectionCounter:
    """Counts refused input by reason; the numbers surface in stats and tests."""

    by_reason: Counter[str] = field(default_factory=Counter)

    def count(self, reason: str) -> None:
        self.by_reason[reason] += 1

    def total(self) -> int:
        return sum(self.by_reason.values())


class OncePerKey:
    """Answers "first time?" per key, so a flood logs one line per peer and reason.

    Bounded: after ``max_keys`` distinct keys nothing more is remembered (and nothing
    more is logged), so peer-chosen keys cannot grow it.
    """

    def __init__(self, max_keys: int = 4096) -> None:
        self.max_keys = max_keys
        self._seen: set[tuple[str, ...]] = set()

    def first(self, *key: str) -> bool:
        if key in self._seen or len(self._seen) >= self.max_keys:
            return False
        self._seen.add(key)
        return True


class Transport(abc.ABC):
    """Authenticated peer links in one room. All methods run on the transport's loop."""

    local_id: str
    callbacks: TransportCallbacks
    rejections: RejectionCounter

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def connected_peers(self) -> list[str]:
        """Peers whose link is authenticated and alive."""

    @abc.abstractmethod
    def room_members(self) -> list[str]:
        """Every other peer known to be in the room, linked or not."""

    @abc.abstractmethod
    def link_info(self) -> list[PeerLinkInfo]: ...

    @abc.abstractmethod
    async def send(self, peer_id: str, envelope: Envelope) -> int:
        """Send one envelope; returns encoded bytes. Raises ``PeerUnavailable``."""

    def send_nowait(self, peer_id: str, envelope: Envelope) -> int | None:
        """Send at once if that needs no waiting; ``None`` means use ``send``.

        Small messages on an idle link then cost no extra task or loop iteration, which
        is most of a request's latency on loopback.
        """
        return None

    def link_throughput(self, peer_id: str | None = None) -> float | None:
        """Bytes/s the link to ``peer_id`` moves (``None``: the fastest link's).

        ``None`` back means no link cost is known (an in-process twin): nothing is
        compressed for it.
        """
        return None

    def stats(self) -> dict[str, object]:
        return {"rejections": dict(self.rejections.by_reason)}
