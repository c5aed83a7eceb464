"""Which ICE servers a new link uses, and which candidate pair a live link selected.

aiortc passes only the first STUN URL and the first TURN URL of a configuration to aioice
and silently drops the rest. ``ServerChoice`` therefore hands each new link exactly one of
each, and moves on to the next one of a kind when a link could not gather a candidate
from it (an unreachable server or refused credentials), so a list of several servers
fails over instead of pinning the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from swarm_notebook.transport.ice_config import IceServer

ROUTE_KINDS = ("host", "srflx", "relay", "direct")


@dataclass(frozen=True)
class Route:
    """The nominated candidate pair of a link: candidate types on both ends (``direct``
    on both for the direct backend's TCP stream, which has no candidates)."""

    local_type: str
    remote_type: str
    local_address: str
    remote_address: str

    @property
    def kind(self) -> str:
        """``relay`` if either end relays, ``srflx`` if either is NAT-mapped, ``direct`` for
        a direct stream, else ``host``."""
        types = {self.local_type, self.remote_type}
        if "direct" in types:
            return "direct"
        if "relay" in types:
            return "relay"
        if types & {"srflx", "prflx"}:
            return "srflx"
        return "host"


def selected_route(pc: Any) -> Route | None:
    """The nominated pair of an aiortc ``RTCPeerConnection`` (``None`` until there is one).

    aiortc exposes no selected-pair API for data channels; the pair lives on the aioice
    ``Connection`` behind ``sctp -> dtls -> ice`` transports.
    """
    try:
        connection = pc.sctp.transport.transport._connection
        pair = connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    return Route(
        local_type=str(local.type),
        remote_type=str(remote.type),
        local_address=f"{local.host}:{local.port}",
        remote_address=f"{remote.host}:{remote.port}",
    )


def gathered_types(pc: Any) -> set[str]:
    """Candidate types this end gathered (``host``, ``srflx``, ``relay``)."""
    try:
        candidates = pc.sctp.transport.transport.iceGatherer.getLocalCandidates()
    except AttributeError:
        return set()
    return {str(c.type) for c in candidates}


class ServerChoice:
    """One STUN and one TURN server per new link, rotating past ones that failed."""

    def __init__(self, servers: Sequence[IceServer] = ()) -> None:
        self.servers: tuple[IceServer, ...] = tuple(servers)
        self._stun = 0
        self._turn = 0
        self.rotations = 0

    def replace(self, servers: Sequence[IceServer]) -> None:
        """New list (e.g. renewed credentials): keep the position where the URLs match."""
        old_stun, old_turn = self._current("stun"), self._current("turn")
        self.servers = tuple(servers)
        self._stun = self._index_of("stun", old_stun)
        self._turn = self._index_of("turn", old_turn)

    def _of_kind(self, kind: str) -> list[IceServer]:
        return [s for s in self.servers if s.is_turn == (kind == "turn")]

    def _current(self, kind: str) -> IceServer | None:
        servers = self._of_kind(kind)
        if not servers:
            return None
        return servers[(self._stun if kind == "stun" else self._turn) % len(servers)]

    def _index_of(self, kind: str, server: IceServer | None) -> int:
        urls = [s.url for s in self._of_kind(kind)]
        return urls.index(server.url) if server is not None and server.url in urls else 0

    def for_new_link(self) -> list[IceServer]:
        return [s for s in (self._current("stun"), self._current("turn")) if s is not None]

    def failed(self, used: Sequence[IceServer], gathered: set[str]) -> None:
        """A link using ``used`` gathered ``gathered`` candidate types: skip servers that
        gave none (only when there is another one to try)."""
        for server in used:
            kind, wanted = ("turn", "relay") if server.is_turn else ("stun", "srflx")
            if wanted in gathered or len(self._of_kind(kind)) < 2:
                continue
            if self._current(kind) != server:
                continue  # another link already moved on
            if kind == "turn":
                self._turn += 1
            else:
                self._stun += 1
            self.rotations += 1
