"""Full-mesh peer links over WebRTC data channels (aiortc, or libdatachannel: ``backends``).

Rules this module keeps (each one avoids a known way WebRTC meshes fail):

* The peer with the smaller id always offers, so two peers joining at once never glare.
* Remote candidates that arrive before the remote description are queued, not lost.
* A link carries application messages only after both ends proved their identity keys
  over it (see ``link_auth``); before that it carries no chunked message either, so an
  unauthenticated link cannot make us hold anything.
* Unfinished transfers share one memory budget across every link (``ReassemblyPool``).
* A refused message is reported to its sender (``link.reject`` naming the transfer or the
  message id), which stops sending it and fails the request at once with the reason.
* Liveness comes from our own heartbeats: aiortc's consent check takes ~30 s.
* A dead link is replaced by a new peer connection (aiortc has no ICE restart) while
  both peers remain in the room; the offerer re-dials, the answerer asks it to.
* Links do not depend on the signaling socket: when the server goes away, they stay up.
* aiortc delivers ``message`` events synchronously inside its DTLS loop, where an
  exception would close the whole connection, so the inbound path never raises.
* Backends differ only behind ``backends.base``: peers on aiortc and on libdatachannel
  share a room (the SDP, the channel and what travels on it are the same).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import IceConfigError, PeerUnavailable, ProtocolError
from swarm_notebook.identity import Identity
from swarm_notebook.protocol import oob
from swarm_notebook.protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    encode_envelope_parts,
    envelope_id,
)
from swarm_notebook.protocol.framing import (
    CHUNK,
    DEFAULT_FRAME_SIZE,
    WHOLE,
    Reassembler,
    ReassemblyLimits,
    ReassemblyPool,
    chunk_transfer_id,
    frame_message,
)
from swarm_notebook.protocol.shared_frame import SharedFrame
from swarm_notebook.reasons import Reason, is_reason
from swarm_notebook.transport import link_auth
from swarm_notebook.transport.backends.base import (
    BackendConfig,
    BackendCounters,
    DataChannel,
    PeerBackend,
)
from swarm_notebook.transport.backends.select import backend_factory, backend_name, prepare
from swarm_notebook.transport.base import (
    LinkState,
    OncePerKey,
    PeerLinkInfo,
    Refusal,
    RejectionCounter,
    Transport,
    TransportCallbacks,
)
from swarm_notebook.transport.ice_config import IceServer, parse_servers
from swarm_notebook.transport.ice_hosts import host_addresses_from_env
from swarm_notebook.transport.ice_path import ServerChoice
from swarm_notebook.transport.throughput import ThroughputEstimate

log = logging.getLogger(__name__)

MAX_PENDING_CANDIDATES = 64
MAX_REMEMBERED_SENDS = 512  # chunked messages per link a refusal can still be matched to
# Whole frames this large are remembered by id too: a peer with a smaller message limit
# refuses them by id (no transfer), and a refused reply must still reach its asker.
REMEMBERED_WHOLE_BYTES = 16 * 1024
MAX_REFUSAL_DETAIL = 300
LIVENESS_CHECK_S = 0.25


class SignalingPort(Protocol):
    """What the mesh needs from a signaling client (see ``swarm_notebook.signaling``)."""

    @property
    def members(self) -> frozenset[str]: ...
    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def send_signal(self, to: str, data: dict[str, Any]) -> None: ...


class SignalingEvents(Protocol):
    """What a signaling client reports to the mesh; ``MeshTransport`` implements it.

    Each method runs on the mesh's loop and must not block.
    """

    def signal_received(self, from_peer: str, data: dict[str, Any]) -> None: ...
    def peer_joined(self, peer_id: str) -> None: ...
    def peer_left(self, peer_id: str) -> None: ...
    def signal_undeliverable(self, peer_id: str) -> None: ...
    def set_issued_ice_servers(self, servers: list[dict[str, Any]]) -> None: ...


SignalingFactory = Callable[[SignalingEvents], SignalingPort]
"""Builds a signaling client that reports its events to the given listener."""


@dataclass
class MeshConfig:
    # None: this peer set no servers, so it uses what the signaling server issues (if any).
    # Validated entries, see ``transport.ice_config``.
    ice_servers: list[dict[str, Any]] | None = None
    ice_policy: str | None = None  # "relay": relay candidates only; None or "all": any
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 3.5
    connect_timeout_s: float = 15.0
    # A dial that could reach none of its ICE servers (e.g. during an outage) gets only
    # host candidates: give it this long, then dial again, instead of holding the link.
    host_only_connect_timeout_s: float = 3.0
    frame_size: int = DEFAULT_FRAME_SIZE
    # A backend that negotiates message sizes sends frames up to its limit, at most this:
    # fewer frames, less Python per byte. native: the peer's advertised max-message-size
    # (256 KiB from libdatachannel); direct: 1 MiB, its stream's frame cap; aiortc: none
    # (``frame_size``).
    max_frame_size: int = 1024 * 1024
    # The direct backend: how long an answerer tries the offerer's TLS listener before
    # the link falls back to WebRTC (on loopback or a LAN it takes a few milliseconds).
    direct_connect_timeout_s: float = 1.5
    max_message_bytes: int = 128 * 1024 * 1024
    reassembly: ReassemblyLimits = field(default_factory=ReassemblyLimits)
    buffer_high_water: int = 1024 * 1024
    buffer_low_water: int = 256 * 1024
    redial_initial_s: float = 0.5
    redial_max_s: float = 10.0
    maintenance_interval_s: float = 0.5
    # ICE host candidates: None offers every interface; ["127.0.0.1"] keeps peers that
    # share one machine on loopback. Defaults to $SWARM_NOTEBOOK_ICE_HOSTS.
    host_addresses: list[str] | None = field(default_factory=host_addresses_from_env)
    # "aiortc", "native" (libdatachannel) or "direct" (TLS over TCP where peers reach
    # each other, else aiortc); None: $SWARM_NOTEBOOK_TRANSPORT_BACKEND, then aiortc.
    # See ``backends.select``.
    backend: str | None = None

    def backend_config(
        self, servers: list[IceServer] | None = None, counters: BackendCounters | None = None
    ) -> BackendConfig:
        """What a new peer connection gets: these servers (default: the configured ones),
        counting into ``counters`` (the mesh's own)."""
        chosen = servers if servers is not None else list(parse_servers(self.ice_servers or []))
        return BackendConfig(
            ice_servers=chosen,
            relay_only=self.ice_policy == "relay",
            host_addresses=self.host_addresses,
            direct_connect_timeout_s=self.direct_connect_timeout_s,
            counters=counters if counters is not None else BackendCounters(),
        )


@dataclass
class _Link:
    peer_id: str
    offerer: bool
    session: str
    pc: PeerBackend
    reassembler: Reassembler
    created: float
    channel: DataChannel | None = None
    state: LinkState = LinkState.CONNECTING
    local_nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    remote_nonce: str | None = None
    sent_auth: bool = False
    pending_candidates: list[dict[str, Any]] = field(default_factory=list)
    last_seen: float = 0.0
    connected_since: float | None = None
    rtt_ms: float | None = None
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    ping_seq: int = 0
    # transfer id -> (type, id, reply_to) of the chunked messages we sent on this link
    sent: OrderedDict[int, tuple[str, str, str | None]] = field(default_factory=OrderedDict)
    # message id -> (type, id, reply_to) of large whole frames we sent on this link
    sent_whole: OrderedDict[str, tuple[str, str, str | None]] = field(default_factory=OrderedDict)
    sending: set[int] = field(default_factory=set)  # transfers still leaving
    aborted: set[int] = field(default_factory=set)  # ... of which the receiver refused
    bytes_in: int = 0
    bytes_out: int = 0
    ice_servers: tuple[IceServer, ...] = ()
    host_only: bool = False
    remote_backend: str | None = None  # what the peer said in its hello (older peers: None)
    frame_size: int = DEFAULT_FRAME_SIZE  # this link's, set when the channel opens
    throughput: ThroughputEstimate = field(default_factory=ThroughputEstimate)
    # transfer id -> when its first chunk arrived (bounded: at most max_transfers unfinished)
    rx_started: dict[int, float] = field(default_factory=dict)


def _remember(sent: OrderedDict[Any, tuple[str, str, str | None]], key: Any, env: Envelope) -> None:
    """What a later refusal naming ``key`` (a transfer or a message id) was about."""
    sent[key] = (env.type, env.id, env.reply_to)
    while len(sent) > MAX_REMEMBERED_SENDS:
        sent.popitem(last=False)


@dataclass
class _Redial:
    attempts: int = 0
    next_at: float = 0.0


class MeshTransport(Transport):
    """Authenticated WebRTC links to every other peer in a signaling room.

    Runs entirely on one event loop (aiortc objects are bound to the loop that made them;
    the native backend bridges its threads into it). An unknown or uninstalled backend
    is a ``TransportBackendError`` here, before anything connects.
    """

    def __init__(
        self,
        identity: Identity,
        signaling_factory: SignalingFactory,
        config: MeshConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.local_id = identity.peer_id
        self.config = config or MeshConfig()
        self.backend = backend_name(self.config.backend)
        self._make_backend = backend_factory(self.backend)
        self.callbacks = TransportCallbacks()
        self.rejections = RejectionCounter()
        self.backend_counters = BackendCounters()  # what this mesh's links' backends count
        self._clock = clock
        self._signaling = signaling_factory(self)
        self._links: dict[str, _Link] = {}
        self._redial: dict[str, _Redial] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        self._tasks = OwnedTasks("mesh")
        self._transfer_ids = itertools.count(1)
        self._reassembly_pool = ReassemblyPool(self.config.reassembly.max_total_pending_bytes)
        self._reassembly_pool.on_evict = self._reassembly_evicted
        self._logged = OncePerKey()
        self._closed = False
        # Peer connections of failed links still closing: awaited by close(), never
        # cancelled (a cancelled aiortc close leaves its DTLS/SCTP/ICE tasks running).
        self._closing: set[asyncio.Task[None]] = set()
        configured = self.config.ice_servers
        self._servers = ServerChoice(parse_servers(configured) if configured is not None else ())
        self._servers_configured = configured is not None
        self.counters: dict[str, int] = {
            "frames_in": 0,
            "frames_out": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "messages_in": 0,
            "messages_out": 0,
            "dials": 0,
            "links_lost": 0,
            "dials_failed": 0,
            "rejects_from_peers": 0,
            "ice_servers_issued": 0,
            "host_only_dials": 0,
        }

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        prepare(self.backend, self.config.host_addresses)
        await self._signaling.start()
        self._tasks.spawn(self._maintenance_loop(), name="mesh-maintenance")
        self._tasks.spawn(self._heartbeat_loop(), name="mesh-heartbeat")
        for peer in self._signaling.members:
            self._maintain_peer(peer)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._tasks.close()
        links = list(self._links.values())
        self._links.clear()
        await asyncio.gather(
            *(self._close_pc(link) for link in links), *self._closing, return_exceptions=True
        )
        await self._signaling.close()

    # -- queries ---------------------------------------------------------------------

    def connected_peers(self) -> list[str]:
        return [p for p, link in self._links.items() if link.state is LinkState.CONNECTED]

    def room_members(self) -> list[str]:
        return sorted(set(self._signaling.members) | set(self.connected_peers()))

    def link_info(self) -> list[PeerLinkInfo]:
        infos = []
        for peer in self.room_members():
            link = self._links.get(peer)
            state = link.state if link else LinkState.GONE
            infos.append(
                PeerLinkInfo(
                    peer_id=peer,
                    state=state,
                    rtt_ms=link.rtt_ms if link else None,
                    connected_since=link.connected_since if link else None,
                    last_seen=link.last_seen if link else None,
                    dials=self._redial.get(peer, _Redial()).attempts,
                    bytes_in=link.bytes_in if link else 0,
                    bytes_out=link.bytes_out if link else 0,
                    backend=link.remote_backend if link else None,
                    **(self._route(link) if link is not None else {}),
                )
            )
        return infos

    def _route(self, link: _Link) -> dict[str, Any]:
        if link.state is not LinkState.CONNECTED:
            return {}
        route = link.pc.selected_route()
        if route is None:
            return {}
        # Our relay came from our TURN server; a NAT-mapped route from our STUN server
        # (aioice reports a server-reflexive pair by its host base, so local says "host").
        # A direct stream used neither.
        wanted = (
            "turn"
            if route.local_type == "relay"
            else "stun"
            if route.kind not in ("host", "direct")
            else ""
        )
        used = [s.url for s in link.ice_servers if ("turn" if s.is_turn else "stun") == wanted]
        return {
            "local_candidate": route.local_type,
            "remote_candidate": route.remote_type,
            "route": route.kind,
            "ice_server": used[0] if used else None,
        }

    def link_throughput(self, peer_id: str | None = None) -> float | None:
        """Measured bytes/s of the link to ``peer_id``; ``None``: the fastest link's.

        A link that carried no large message yet reports aiortc's typical rate.
        """
        if peer_id is not None:
            link = self._links.get(peer_id)
            return link.throughput.bytes_per_s if link is not None else None
        rates = [
            link.throughput.bytes_per_s
            for link in self._links.values()
            if link.state is LinkState.CONNECTED
        ]
        return max(rates) if rates else ThroughputEstimate().bytes_per_s

    @property
    def ice_servers(self) -> tuple[IceServer, ...]:
        """The servers new links use: this peer's own, else those signaling issued."""
        return self._servers.servers

    def set_issued_ice_servers(self, servers: list[dict[str, Any]]) -> None:
        """ICE servers from the signaling server; links made from now on use them.

        Ignored when this peer configured its own (peer-side settings win).
        """
        if self._servers_configured:
            return
        try:
            parsed = parse_servers(servers, "issued by the signaling server")
        except IceConfigError as exc:
            self.rejections.count("bad-ice-config")
            log.warning("ignored ICE servers from the signaling server: %s", exc)
            return
        self.counters["ice_servers_issued"] += 1
        self._servers.replace(parsed)

    @property
    def signaling_connected(self) -> bool:
        return bool(self._signaling.connected)

    @property
    def identity_conflicts(self) -> int:
        """Times another holder of our key took our place at the signaling server."""
        return int(getattr(self._signaling, "identity_conflicts", 0))

    def stats(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "rejections": dict(self.rejections.by_reason),
            "signaling_connected": self.signaling_connected,
            "reassembly_pending_bytes": self._reassembly_pool.pending_bytes,
            "identity_conflicts": self.identity_conflicts,
            "backend_counters": dict(self.backend_counters.by_name),
            **self.counters,
        }

    # -- sending ---------------------------------------------------------------------

    async def send(self, peer_id: str, envelope: Envelope) -> int:
        link = self._links.get(peer_id)
        if link is None or link.state is not LinkState.CONNECTED:
            raise PeerUnavailable(f"no authenticated link to peer {peer_id[:16]}")
        # Parts, not one buffer: a frame's Arrow bytes are chunked from the caller's own
        # buffer instead of being copied into the message first.
        parts = encode_envelope_parts(envelope)
        size = oob.size(parts)
        if size > self.config.max_message_bytes:
            raise ProtocolError(
                Reason.OVERSIZED, f"{size} bytes > limit {self.config.max_message_bytes}"
            )
        await self._send_payload(link, parts, size, envelope)
        self.counters["messages_out"] += 1
        return size

    def send_nowait(self, peer_id: str, envelope: Envelope) -> int | None:
        link = self._links.get(peer_id)
        channel = link.channel if link is not None else None
        if (
            link is None
            or link.state is not LinkState.CONNECTED
            or channel is None
            or not channel.is_open
            or channel.buffered_amount > self.config.buffer_high_water
        ):
            return None
        # Parts: a message with large binaries is never one frame, and encoding it whole
        # just to find that out copied a 50 MB frame into a throwaway buffer.
        parts = encode_envelope_parts(envelope)
        if len(parts) > 1 or len(parts[0]) + 1 > link.frame_size:
            return None
        payload = parts[0]
        if len(payload) >= REMEMBERED_WHOLE_BYTES:
            _remember(link.sent_whole, envelope.id, envelope)
        channel.send(bytes((WHOLE,)) + payload)
        self.counters["frames_out"] += 1
        self.counters["bytes_out"] += len(payload) + 1
        link.bytes_out += len(payload) + 1
        self.counters["messages_out"] += 1
        return len(payload)

    async def _send_payload(
        self, link: _Link, parts: list[oob.Buffer], size: int, envelope: Envelope
    ) -> None:
        transfer_id = next(self._transfer_ids)
        if size + 1 > link.frame_size:  # chunked: a refusal names its transfer
            _remember(link.sent, transfer_id, envelope)
        elif size >= REMEMBERED_WHOLE_BYTES:  # whole: a refusal names its id
            _remember(link.sent_whole, envelope.id, envelope)
        link.sending.add(transfer_id)
        started = time.perf_counter()
        try:
            for frame in frame_message(parts, transfer_id, link.frame_size):
                if transfer_id in link.aborted:
                    return  # the receiver refused it: the rest would only be dropped there
                channel = link.channel
                if channel is None or not channel.is_open:
                    raise PeerUnavailable(f"link to {link.peer_id[:16]} closed while sending")
                while channel.buffered_amount > self.config.buffer_high_water:
                    link.writable.clear()
                    try:
                        await asyncio.wait_for(link.writable.wait(), self.config.peer_timeout_s)
                    except TimeoutError:
                        if link.state is LinkState.GONE or not channel.is_open:
                            raise PeerUnavailable(f"link to {link.peer_id[:16]} lost") from None
                channel.send(frame)
                self.counters["frames_out"] += 1
                self.counters["bytes_out"] += len(frame)
                link.bytes_out += len(frame)
            # Sent once the last chunk is queued: at most buffer_high_water still waits.
            link.throughput.add(size, time.perf_counter() - started)
        finally:
            link.sending.discard(transfer_id)
            link.aborted.discard(transfer_id)

    def _send_control(self, link: _Link, type_: str, body: dict[str, Any]) -> None:
        """Fire a small link-level message; control messages never wait on back-pressure."""
        channel = link.channel
        if channel is None or not channel.is_open:
            return
        env = Envelope(v=PROTOCOL_VERSION, type=type_, id=uuid.uuid4().hex, body=body)
        payload = encode_envelope(env)
        for frame in frame_message(payload, next(self._transfer_ids), link.frame_size):
            channel.send(frame)
            self.counters["frames_out"] += 1
            self.counters["bytes_out"] += len(frame)

    # -- signaling events --------------------------------------------------------------

    def peer_joined(self, peer_id: str) -> None:
        if link_auth.link_id_problem(peer_id) is not None:
            self.rejections.count("bad-id")  # a lenient or hostile server announced it
            return
        if peer_id != self.local_id:
            self._redial.pop(peer_id, None)
            self._maintain_peer(peer_id)

    def peer_left(self, peer_id: str) -> None:
        # Leaving signaling says nothing about the link: a peer whose signaling socket
        # dropped may still be perfectly reachable. Heartbeats decide whether it is gone.
        link = self._links.get(peer_id)
        if link is not None and link.state is LinkState.CONNECTING:
            self._fail_link(link, "peer left the room")

    def signal_undeliverable(self, peer_id: str) -> None:
        """The server says ``peer_id`` is not in the room: a link forming to it cannot finish.

        Our membership view keeps a departed peer for a grace period, so without this a
        dial to it would wait out the connect timeout.
        """
        link = self._links.get(peer_id)
        if link is not None and link.state is LinkState.CONNECTING:
            self._fail_link(link, f"{Reason.UNKNOWN_PEER}: peer {peer_id[:16]} is not in the room")

    def signal_received(self, from_peer: str, data: dict[str, Any]) -> None:
        if self._closed:
            return
        if link_auth.link_id_problem(from_peer) is not None:
            # Only a lenient or hostile signaling server forwards these; never dial them.
            self.rejections.count("bad-id")
            return
        lock = self._peer_locks.setdefault(from_peer, asyncio.Lock())
        self._tasks.spawn(self._handle_signal(lock, from_peer, data), name="mesh-signal")

    async def _handle_signal(self, lock: asyncio.Lock, peer: str, data: dict[str, Any]) -> None:
        async with lock:
            kind = data.get("kind")
            session = data.get("session")
            try:
                if (
                    kind == "offer"
                    and isinstance(session, str)
                    and isinstance(data.get("sdp"), str)
                ):
                    await self._accept_offer(peer, session, data["sdp"])
                elif (
                    kind == "answer"
                    and isinstance(session, str)
                    and isinstance(data.get("sdp"), str)
                ):
                    await self._accept_answer(peer, session, data["sdp"])
                elif kind == "candidate" and isinstance(session, str):
                    await self._accept_candidate(peer, session, data.get("candidate"))
                elif kind == "redial":
                    self._redial_requested(peer)
                else:
                    self.rejections.count("bad-signal")
            except Exception as exc:  # a bad SDP must not take the mesh down
                self.rejections.count("bad-signal")
                log.warning("signal %s from %s failed: %s", kind, peer[:16], exc)
                link = self._links.get(peer)
                if link is not None and link.session == session:
                    self._fail_link(link, f"signal {kind} failed: {exc}")

    # -- dialling --------------------------------------------------------------------

    def _is_offerer(self, peer_id: str) -> bool:
        return self.local_id < peer_id

    def _maintain_peer(self, peer_id: str) -> None:
        """Make progress towards a link with ``peer_id`` if none is alive or forming."""
        if self._closed or peer_id == self.local_id or link_auth.link_id_problem(peer_id):
            return  # never dial an id that is not a key's one spelling
        link = self._links.get(peer_id)
        now = self._clock()
        if link is not None and link.state is not LinkState.GONE:
            overdue = now - link.created > self._connect_timeout(link)
            if link.state is not LinkState.CONNECTED and overdue:
                self._fail_link(link, "connect timeout")
            return
        redial = self._redial.setdefault(peer_id, _Redial())
        if now < redial.next_at or not self._signaling.connected:
            return
        redial.attempts += 1
        delay = min(
            self.config.redial_max_s, self.config.redial_initial_s * 2 ** min(redial.attempts, 8)
        )
        redial.next_at = now + delay * random.uniform(0.5, 1.0)
        if self._is_offerer(peer_id):
            lock = self._peer_locks.setdefault(peer_id, asyncio.Lock())
            self._tasks.spawn(self._dial(lock, peer_id), name="mesh-dial")
        else:
            self._tasks.spawn(self._ask_redial(peer_id), name="mesh-ask-redial")

    def _redial_requested(self, peer_id: str) -> None:
        if not self._is_offerer(peer_id):
            self.rejections.count("bad-signal")
            return
        link = self._links.get(peer_id)
        if link is not None and link.state is LinkState.CONNECTED:
            # The answerer lost the link we still think alive: believe it, ours is stale.
            self._fail_link(link, "remote asked for a redial")
        self._redial.setdefault(peer_id, _Redial()).next_at = 0.0
        self._maintain_peer(peer_id)

    async def _ask_redial(self, peer_id: str) -> None:
        try:
            await self._signaling.send_signal(peer_id, {"kind": "redial"})
        except Exception as exc:
            log.debug("redial request to %s not sent: %s", peer_id[:16], exc)

    def _new_link(self, peer_id: str, offerer: bool, session: str) -> _Link:
        servers = self._servers.for_new_link()
        pc = self._make_backend(self.config.backend_config(servers, self.backend_counters))
        link = _Link(
            peer_id=peer_id,
            offerer=offerer,
            session=session,
            pc=pc,
            reassembler=Reassembler(self.config.reassembly, self._reassembly_pool),
            created=self._clock(),
            ice_servers=tuple(servers),
            frame_size=self.config.frame_size,
        )
        link.writable.set()

        def _failed(state: str) -> None:
            if self._links.get(peer_id) is link:
                self._fail_link(link, f"connection {state}")

        pc.on_failed = _failed

        old = self._links.get(peer_id)
        if old is not None:
            self._fail_link(old, "replaced by a new session", redial=False)
        self._links[peer_id] = link
        return link

    async def _dial(self, lock: asyncio.Lock, peer_id: str) -> None:
        async with lock:
            link = self._links.get(peer_id)
            if self._closed or (link is not None and link.state is not LinkState.GONE):
                return
            self.counters["dials"] += 1
            link = self._new_link(peer_id, offerer=True, session=uuid.uuid4().hex)
            self._attach_channel(link, link.pc.create_channel("swarm"))
            sdp = await link.pc.create_offer()
            self._gathered(link)
            try:
                await self._signaling.send_signal(
                    peer_id, {"kind": "offer", "session": link.session, "sdp": sdp}
                )
            except Exception as exc:
                self._fail_link(link, f"offer not sent: {exc}")

    async def _accept_offer(self, peer_id: str, session: str, sdp: str) -> None:
        if self._is_offerer(peer_id):
            # The rule says we offer to this peer; an offer from it is a protocol breach.
            self.rejections.count("unexpected-offer")
            return
        existing = self._links.get(peer_id)
        if existing is not None and existing.session == session:
            return
        link = self._new_link(peer_id, offerer=False, session=session)
        pc = link.pc

        def _on_channel(channel: DataChannel) -> None:
            if channel.label == "swarm" and link.channel is None:
                self._attach_channel(link, channel)
                if channel.is_open:
                    self._channel_open(link)

        pc.on_channel = _on_channel
        await pc.set_remote_description(sdp, "offer")
        await self._flush_candidates(link)
        answer = await pc.create_answer()
        self._gathered(link)
        await self._signaling.send_signal(
            peer_id, {"kind": "answer", "session": session, "sdp": answer}
        )

    def _connect_timeout(self, link: _Link) -> float:
        if link.host_only:
            return min(self.config.connect_timeout_s, self.config.host_only_connect_timeout_s)
        return self.config.connect_timeout_s

    def _gathered(self, link: _Link) -> None:
        """After gathering: note a dial that reached none of its ICE servers.

        Such a dial can still link over host candidates (a shared LAN), so it is not
        failed at once, but it gets a short connect timeout and the next dial comes
        soon: the servers (or the network) may be back by then.
        """
        if not link.ice_servers:
            return
        types = link.pc.gathered_types()
        self._servers.failed(link.ice_servers, types)
        if types <= {"host"}:
            link.host_only = True
            self.counters["host_only_dials"] += 1
            log.info("dial to %s reached no ICE server (only host candidates)", link.peer_id[:16])

    async def _accept_answer(self, peer_id: str, session: str, sdp: str) -> None:
        link = self._links.get(peer_id)
        if link is None or link.session != session or not link.offerer:
            self.rejections.count("stale-answer")
            return
        if link.pc.remote_sdp is not None:
            return
        await link.pc.set_remote_description(sdp, "answer")
        await self._flush_candidates(link)

    async def _accept_candidate(self, peer_id: str, session: str, candidate: Any) -> None:
        link = self._links.get(peer_id)
        if link is None or link.session != session or not isinstance(candidate, dict):
            self.rejections.count("stale-candidate")
            return
        if link.pc.remote_sdp is None:
            if len(link.pending_candidates) >= MAX_PENDING_CANDIDATES:
                self.rejections.count("too-many-candidates")
                return
            link.pending_candidates.append(candidate)
            return
        await self._add_candidate(link, candidate)

    async def _flush_candidates(self, link: _Link) -> None:
        pending, link.pending_candidates = link.pending_candidates, []
        for candidate in pending:
            await self._add_candidate(link, candidate)

    async def _add_candidate(self, link: _Link, candidate: dict[str, Any]) -> None:
        await link.pc.add_ice_candidate(candidate)

    # -- channel and authentication ------------------------------------------------------

    def _attach_channel(self, link: _Link, channel: DataChannel) -> None:
        link.channel = channel
        channel.set_buffered_amount_low_threshold(self.config.buffer_low_water)

        def _closed() -> None:
            if self._links.get(link.peer_id) is link:
                self._fail_link(link, "data channel closed")

        events = channel.events
        events.on_open = lambda: self._channel_open(link)
        events.on_message = lambda data: self._on_frame(link, data)
        events.on_buffered_low = link.writable.set
        events.on_close = _closed

    def _channel_open(self, link: _Link) -> None:
        if link.state is not LinkState.CONNECTING:
            return
        link.state = LinkState.AUTHENTICATING
        link.last_seen = self._clock()
        limit = link.pc.max_frame_bytes()
        link.frame_size = (
            self.config.frame_size if limit is None else min(limit, self.config.max_frame_size)
        )
        self._send_control(
            link,
            "link.hello",
            {
                "peer_id": self.local_id,
                "nonce": link.local_nonce,
                "session": link.session,
                "backend": self.backend,
            },
        )
        self._maybe_send_auth(link)

    def _transcript(self, link: _Link) -> bytes | None:
        local, remote = link.pc.local_sdp, link.pc.remote_sdp
        if link.remote_nonce is None or local is None or remote is None:
            return None
        offer_sdp, answer_sdp = (local, remote) if link.offerer else (remote, local)
        offerer, answerer = (
            (self.local_id, link.peer_id) if link.offerer else (link.peer_id, self.local_id)
        )
        offerer_nonce, answerer_nonce = (
            (link.local_nonce, link.remote_nonce)
            if link.offerer
            else (link.remote_nonce, link.local_nonce)
        )
        return link_auth.transcript(
            session=link.session,
            offerer=offerer,
            answerer=answerer,
            offerer_nonce=offerer_nonce,
            answerer_nonce=answerer_nonce,
            offer_fingerprints=link_auth.sdp_fingerprints(offer_sdp),
            answer_fingerprints=link_auth.sdp_fingerprints(answer_sdp),
        )

    def _maybe_send_auth(self, link: _Link) -> None:
        if link.sent_auth or link.state is not LinkState.AUTHENTICATING:
            return
        data = self._transcript(link)
        if data is None:
            return
        link.sent_auth = True
        self._send_control(link, "link.auth", {"signature": self.identity.sign(data)})

    def _on_link_message(self, link: _Link, env: Envelope) -> None:
        body = env.body if isinstance(env.body, dict) else {}
        if env.type == "link.hello":
            if body.get("peer_id") != link.peer_id or body.get("session") != link.session:
                self._reject_link(link, "hello-mismatch")
                return
            nonce = body.get("nonce")
            if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
                self._reject_link(link, "bad-hello")
                return
            link.remote_nonce = nonce
            backend = body.get("backend")
            link.remote_backend = backend[:32] if isinstance(backend, str) else None
            self._maybe_send_auth(link)
        elif env.type == "link.auth":
            signature = body.get("signature")
            data = self._transcript(link)
            if link_auth.link_id_problem(link.peer_id) is not None:
                self._reject_link(link, "bad-id")
                return
            if (
                link.state is not LinkState.AUTHENTICATING
                or data is None
                or not isinstance(signature, bytes)
                or not link_auth.verify_transcript(link.peer_id, signature, data)
            ):
                self._reject_link(link, "auth-failed")
                return
            link.state = LinkState.CONNECTED
            link.connected_since = time.time()
            self._redial.pop(link.peer_id, None)
            self._safe_callback(self.callbacks.on_peer_up, link.peer_id)
        elif env.type == "link.ping":
            self._send_control(link, "link.pong", {"seq": body.get("seq"), "t": body.get("t")})
        elif env.type == "link.pong":
            sent = body.get("t")
            if isinstance(sent, float) and body.get("seq") == link.ping_seq:
                link.rtt_ms = (self._clock() - sent) * 1000.0
        elif env.type == "link.reject":
            self._peer_refused(link, body)
        else:
            self.rejections.count("unknown-link-message")

    def _peer_refused(self, link: _Link, body: dict[str, Any]) -> None:
        """The peer refused something we sent: stop sending it and tell whoever waits."""
        self.counters["rejects_from_peers"] += 1
        raw_reason = body.get("reason")
        reason = str(raw_reason) if is_reason(raw_reason) else Reason.REFUSED
        detail = str(body.get("detail") or "")[:MAX_REFUSAL_DETAIL]
        transfer = body.get("transfer")
        message_id = body.get("id")
        sent = link.sent.pop(transfer, None) if isinstance(transfer, int) else None
        whole = link.sent_whole.pop(message_id, None) if isinstance(message_id, str) else None
        if sent is not None and isinstance(transfer, int):
            if transfer in link.sending:
                link.aborted.add(transfer)
            refusal = Refusal(reason, detail, sent[1], sent[0], sent[2])
        elif whole is not None:
            refusal = Refusal(reason, detail, whole[1], whole[0], whole[2])
        elif isinstance(message_id, str) and len(message_id) <= 64:
            refusal = Refusal(reason, detail, message_id)
        else:
            refusal = Refusal(reason, detail)
        if self._logged.first(link.peer_id, "refused-by-peer", reason):
            log.info("peer %s refused our message: %s %s", link.peer_id[:16], reason, detail)
        self._safe_callback(self.callbacks.on_refused, link.peer_id, refusal)

    def _reassembly_evicted(self, reassembler: Reassembler, transfer: int) -> None:
        link = next((x for x in self._links.values() if x.reassembler is reassembler), None)
        if link is None:
            return
        self._count_rejection(link, Reason.REASSEMBLY_FULL, f"transfer {transfer} evicted")
        if link.state is LinkState.CONNECTED:
            self._tell_refused(
                link, Reason.REASSEMBLY_FULL, "unfinished transfers on all links", transfer
            )

    def _count_rejection(self, link: _Link, reason: str, what: object) -> None:
        self.rejections.count(reason)
        if self._logged.first(link.peer_id, reason):
            log.info(
                "frame from %s rejected: %s (further ones not logged)", link.peer_id[:16], what
            )

    def _reject_link(self, link: _Link, reason: str) -> None:
        self.rejections.count(reason)
        log.warning("link to %s refused: %s", link.peer_id[:16], reason)
        self._fail_link(link, reason)

    # -- inbound path (must never raise) ---------------------------------------------------

    def _on_frame(self, link: _Link, data: bytes | str) -> None:
        env: Envelope | None = None
        refused_id: str | None = None
        transfer: int | None = None
        try:
            now = self._clock()
            link.last_seen = now
            self.counters["frames_in"] += 1
            if isinstance(data, str):
                raise ProtocolError(Reason.TEXT_FRAME, "binary frames only")
            self.counters["bytes_in"] += len(data)
            link.bytes_in += len(data)
            transfer = chunk_transfer_id(data)
            if data[:1] == bytes((CHUNK,)) and link.state is not LinkState.CONNECTED:
                # Proofs of identity are small whole frames: nothing is reassembled for a
                # peer that has not proved who it is.
                raise ProtocolError(
                    Reason.UNAUTHENTICATED, "chunked message before proof of identity"
                )
            if transfer is not None and transfer not in link.rx_started:
                if len(link.rx_started) >= self.config.reassembly.max_transfers:
                    link.rx_started.clear()  # only refused transfers leave entries behind
                link.rx_started[transfer] = time.perf_counter()
            try:
                payload = link.reassembler.feed(data, now)
            except ProtocolError as exc:
                if transfer is None and exc.reason == Reason.OVERSIZED:
                    # One whole frame over our limit (a direct link's frames reach 1 MiB):
                    # no transfer to refuse, so the refusal names the message instead.
                    refused_id = envelope_id(memoryview(data)[1:])
                raise
            if payload is None:
                return
            if transfer is not None:
                began = link.rx_started.pop(transfer, None)
                if began is not None:
                    link.throughput.add(len(payload), time.perf_counter() - began)
            size = len(payload)
            # The body's large binaries are views of ``payload`` (decoded in place); this
            # frame's own reference goes now, so the buffer lives only as long as they do.
            # A reassembled message's buffer is this link's alone: its binaries may
            # become the memory of the values decoded from them (``oob.parse``).
            # A memfd's frame goes as a view of it (the views decoded from it keep it).
            message: oob.Buffer = (
                memoryview(payload) if isinstance(payload, SharedFrame) else payload
            )
            env = decode_envelope(
                message,
                max_size=self.config.max_message_bytes,
                owned=not isinstance(message, bytes),
            )
            del message
            del payload
            if env.type.startswith("link."):
                self._on_link_message(link, env)
                return
            if link.state is not LinkState.CONNECTED:
                raise ProtocolError(
                    Reason.UNAUTHENTICATED, "application message before proof of identity"
                )
            self.counters["messages_in"] += 1
            self.callbacks.on_message(link.peer_id, env, size)
        except ProtocolError as exc:
            self._count_rejection(link, str(exc.reason), exc)
            if link.state is LinkState.CONNECTED:
                message_id = env.id if env is not None else refused_id
                self._tell_refused(link, str(exc.reason), exc.detail, transfer, message_id)
        except Exception:
            self.rejections.count("internal-error")
            log.exception("inbound frame from %s", link.peer_id[:16])

    def _tell_refused(
        self,
        link: _Link,
        reason: str,
        detail: str,
        transfer: int | None,
        message_id: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"reason": reason, "detail": detail[:MAX_REFUSAL_DETAIL]}
        if transfer is not None:
            body["transfer"] = transfer
        if message_id is not None:
            body["id"] = message_id
        self._send_control(link, "link.reject", body)

    def _safe_callback(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("transport callback failed")

    # -- liveness ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        # Silence is checked more often than pings go out: a dead link is then noticed
        # within peer_timeout_s plus a quarter second, not up to a whole interval later.
        interval = self.config.heartbeat_interval_s
        check_every = min(interval, LIVENESS_CHECK_S)
        next_ping = self._clock() + interval
        while True:
            await asyncio.sleep(check_every)
            now = self._clock()
            ping = now >= next_ping
            if ping:
                next_ping = now + interval
            for link in list(self._links.values()):
                if link.state is LinkState.CONNECTED or link.state is LinkState.AUTHENTICATING:
                    if now - link.last_seen > self.config.peer_timeout_s:
                        self._fail_link(link, "heartbeat timeout")
                        continue
                    if ping and link.state is LinkState.CONNECTED:
                        link.ping_seq += 1
                        self._send_control(link, "link.ping", {"seq": link.ping_seq, "t": now})
                if ping:
                    for transfer in link.reassembler.expire(now):
                        self._count_rejection(
                            link, Reason.REASSEMBLY_TIMEOUT, f"transfer {transfer}"
                        )
                        if link.state is LinkState.CONNECTED:
                            self._tell_refused(
                                link,
                                Reason.REASSEMBLY_TIMEOUT,
                                f"no chunk for {self.config.reassembly.timeout_s:g} s",
                                transfer,
                            )

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval_s)
            for peer in self._signaling.members:
                self._maintain_peer(peer)
            for peer, link in list(self._links.items()):
                if link.state is not LinkState.CONNECTED and peer not in self._signaling.members:
                    if self._clock() - link.created > self._connect_timeout(link):
                        self._fail_link(link, "connect timeout")

    def _fail_link(self, link: _Link, reason: str, redial: bool = True) -> None:
        if link.state is LinkState.GONE:
            return
        was_connected = link.state is LinkState.CONNECTED
        link.state = LinkState.GONE
        link.writable.set()
        link.reassembler.clear()
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        if was_connected:
            self.counters["links_lost"] += 1
            log.info("link to %s lost: %s", link.peer_id[:16], reason)
            self._safe_callback(self.callbacks.on_peer_down, link.peer_id, reason)
        else:
            self.counters["dials_failed"] += 1
            log.info("link to %s not formed: %s", link.peer_id[:16], reason)
            self._safe_callback(self.callbacks.on_dial_failed, link.peer_id, reason)
        if not self._closed:
            closing = asyncio.get_running_loop().create_task(
                self._close_pc(link), name="mesh-close-pc"
            )
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            if redial and link.peer_id in self._signaling.members:
                state = self._redial.setdefault(link.peer_id, _Redial())
                if link.host_only or was_connected:
                    # Not a sign the peer is unreachable: the network is (or was) down.
                    # Keep the next dials close together so the link is back soon after.
                    state.attempts = 0
                    state.next_at = min(state.next_at, self._clock() + self.config.redial_initial_s)

    async def _close_pc(self, link: _Link) -> None:
        try:
            await link.pc.close()
        except Exception as exc:
            log.debug("closing pc for %s: %s", link.peer_id[:16], exc)
