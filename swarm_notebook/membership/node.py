"""Membership on top of a transport: who is here, what each peer can do, how busy it is."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import CardError, HandlerRefusal
from swarm_notebook.identity import Identity
from swarm_notebook.membership.agent_card import AgentCard, LoadReport, make_card, verify_card
from swarm_notebook.membership.routing import Candidate
from swarm_notebook.transport.base import Transport
from swarm_notebook.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

CARD = "swarm.card"
LOAD = "swarm.load"
LOAD_REPORT_INTERVAL_S = 0.05


class PeerState(StrEnum):
    """A peer's link as the swarm sees it; the dashboard's JavaScript receives this list."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    GONE = "gone"


@dataclass
class PeerView:
    peer_id: str
    state: PeerState = PeerState.CONNECTING
    card: AgentCard | None = None
    load: LoadReport | None = None
    outstanding: int = 0
    connected_since: float | None = None
    last_change: float = 0.0

    @property
    def capabilities(self) -> list[str]:
        return list(self.card.capabilities) if self.card else []

    @property
    def concurrency(self) -> int:
        if self.load is not None:
            return self.load.concurrency
        return self.card.concurrency if self.card else 1

    @property
    def load_fraction(self) -> float:
        busy = (self.load.in_flight + self.load.queued) if self.load else 0
        return max(busy, self.outstanding) / max(1, self.concurrency)


PeerListener = Callable[[str, str], None]
"""(peer id, what changed: "up" | "down" | "card" | "load")."""


class SwarmNode:
    """A peer's view of its room, kept current from cards and load reports."""

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        *,
        name: str = "swarm-notebook",
        version: str = "0",
    ) -> None:
        self.identity = identity
        self.transport = transport
        self.endpoint = Endpoint(transport)
        self.name = name
        self.version = version
        self._capabilities: list[str] = []
        self._concurrency = 1
        self._limits: dict[str, int] = {}
        self._seq = 0
        self._card: AgentCard | None = None
        self._load = LoadReport(0, 0, 1)
        self._load_dirty = False
        self._load_timer: asyncio.TimerHandle | None = None
        self._peers: dict[str, PeerView] = {}
        self._listeners: list[PeerListener] = []
        self._tasks = OwnedTasks("swarm-node")
        self.card_rejections: dict[str, int] = {}
        transport.callbacks.on_peer_up = self._peer_up
        transport.callbacks.on_peer_down = self._peer_down
        self.endpoint.register_message_handler(CARD, self._on_card)
        self.endpoint.register_message_handler(LOAD, self._on_load, schema=LoadReport)

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

    @property
    def card(self) -> AgentCard | None:
        return self._card

    @property
    def capabilities(self) -> list[str]:
        return list(self._capabilities)

    async def start(self) -> None:
        await self.transport.start()

    async def close(self) -> None:
        if self._load_timer is not None:
            self._load_timer.cancel()
        await self._tasks.close()
        await self.endpoint.close()
        await self.transport.close()

    def add_listener(self, listener: PeerListener) -> None:
        self._listeners.append(listener)

    def _notify(self, peer_id: str, what: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(peer_id, what)
            except Exception:
                log.exception("peer listener failed")

    # -- own card and load -----------------------------------------------------------------

    def advertise(
        self,
        capabilities: list[str],
        concurrency: int,
        limits: dict[str, int],
        isolation: str = "",
        environment: dict[str, str] | None = None,
        backend: str = "",
    ) -> AgentCard:
        """Sign a new card and send it to every connected peer."""
        self._capabilities = sorted(set(capabilities))
        self._concurrency = concurrency
        self._limits = dict(limits)
        self._seq += 1
        self._card = make_card(
            self.identity,
            name=self.name,
            version=self.version,
            capabilities=self._capabilities,
            concurrency=concurrency,
            limits=self._limits,
            seq=self._seq,
            isolation=isolation,
            environment=environment,
            backend=backend,
        )
        self._load = LoadReport(self._load.in_flight, self._load.queued, concurrency)
        for peer in self.transport.connected_peers():
            self._tasks.spawn(self._send_card(peer), name="send-card")
        return self._card

    async def _send_card(self, peer_id: str) -> None:
        if self._card is None:
            return
        try:
            await self.endpoint.send(peer_id, CARD, msgspec.structs.asdict(self._card))
            await self.endpoint.send(peer_id, LOAD, msgspec.to_builtins(self._load))
        except Exception as exc:
            log.debug("card to %s not sent: %s", peer_id[:16], exc)

    @property
    def load(self) -> LoadReport:
        return self._load

    def report_load(self, in_flight: int, queued: int) -> None:
        """Record our load; peers hear of it within ``LOAD_REPORT_INTERVAL_S``, coalesced."""
        self._load = LoadReport(in_flight, queued, self._concurrency)
        self._load_dirty = True
        if self._load_timer is None:
            loop = asyncio.get_running_loop()
            self._load_timer = loop.call_later(LOAD_REPORT_INTERVAL_S, self._flush_load)

    def _flush_load(self) -> None:
        self._load_timer = None
        if not self._load_dirty or self._tasks.full():
            return
        self._load_dirty = False
        body = msgspec.to_builtins(self._load)
        self._tasks.spawn(self.endpoint.broadcast(LOAD, body), name="load-broadcast")

    # -- peers -----------------------------------------------------------------------------

    def _view(self, peer_id: str) -> PeerView:
        view = self._peers.get(peer_id)
        if view is None:
            view = self._peers[peer_id] = PeerView(peer_id)
        return view

    def _peer_up(self, peer_id: str) -> None:
        view = self._view(peer_id)
        view.state = PeerState.CONNECTED
        view.connected_since = time.time()
        view.last_change = time.time()
        self._tasks.spawn(self._send_card(peer_id), name="send-card")
        self._notify(peer_id, "up")

    def _peer_down(self, peer_id: str, reason: str) -> None:
        view = self._view(peer_id)
        view.state = PeerState.GONE
        view.last_change = time.time()
        view.outstanding = 0
        self.endpoint.fail_pending_for(peer_id, reason)
        self._notify(peer_id, "down")

    def _on_card(self, peer_id: str, body: Any) -> None:
        try:
            card = verify_card(msgspec.convert(body, AgentCard), peer_id)
        except (msgspec.ValidationError, CardError) as exc:
            reason = getattr(exc, "reason", "wrong-schema")
            self.card_rejections[reason] = self.card_rejections.get(reason, 0) + 1
            raise HandlerRefusal(reason, str(exc)) from exc
        view = self._view(peer_id)
        if view.card is not None and card.seq <= view.card.seq:
            return  # an older card arriving late must not roll capabilities back
        view.card = card
        view.last_change = time.time()
        self._notify(peer_id, "card")

    def _on_load(self, peer_id: str, load: LoadReport) -> None:
        self.update_load(peer_id, load)

    def update_load(self, peer_id: str, load: LoadReport) -> None:
        view = self._view(peer_id)
        view.load = load
        self._notify(peer_id, "load")

    def peers(self) -> list[PeerView]:
        return sorted(self._peers.values(), key=lambda v: v.peer_id)

    def peer(self, peer_id: str) -> PeerView | None:
        return self._peers.get(peer_id)

    def connected_peers(self) -> list[str]:
        return self.transport.connected_peers()

    def candidates(self) -> list[Candidate]:
        connected = set(self.transport.connected_peers())
        return [
            Candidate(
                peer_id=v.peer_id,
                capabilities=frozenset(v.capabilities),
                advertised_load=(v.load.in_flight + v.load.queued) if v.load else 0,
                local_outstanding=v.outstanding,
                concurrency=v.concurrency,
                capacity=v.concurrency + int(v.card.limits.get("max_queue", 0)),
                versions=v.card.environment,
            )
            for v in self._peers.values()
            if v.peer_id in connected and v.card is not None
        ]
