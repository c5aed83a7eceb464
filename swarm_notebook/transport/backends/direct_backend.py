"""The ``direct`` backend: TLS 1.3 over TCP between peers that reach each other, else WebRTC.

It wraps an :class:`AiortcBackend`, so signaling, SDP and ICE are exactly aiortc's and a
link can always fall back to the data channel. The offerer listens on a TCP port before
it hands out its offer and announces it in the SDP (``direct_sdp``); the answerer dials
it while it answers, and says in its answer whether it got through. When both agree the
aiortc connection is closed unused and the mesh gets a :class:`StreamChannel` instead;
on any failure the answer says nothing and the link goes on over WebRTC.

Why the stream is authenticated: the TLS certificate is aiortc's DTLS certificate, whose
fingerprint the offer announces, and the answerer checks it before it sends anything.
The link's proof of identity (``link_auth``) signs both SDPs' fingerprints, so a stream
to anyone but the peer whose key signed would fail that proof. The token keeps strangers
who merely found the port from holding the listener.

A link with ``relay_only`` never listens and never dials: a peer that asked for relayed
links wants its addresses kept to itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import Any

from swarm_notebook.errors import SwarmError, TransportError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends import direct_sdp, direct_tls
from swarm_notebook.transport.backends.aiortc_backend import AiortcBackend
from swarm_notebook.transport.backends.base import (
    BackendConfig,
    ChannelEvents,
    DataChannel,
    PeerBackend,
)
from swarm_notebook.transport.backends.direct_channel import MAX_FRAME, FrameStream, StreamChannel
from swarm_notebook.transport.backends.direct_handshake import Listener, connect
from swarm_notebook.transport.ice_path import Route

log = logging.getLogger(__name__)

NAME = "direct"
ROUTE_TYPE = "direct"
# The mesh opens one channel per link, with this label; the answerer's stream carries it.
CHANNEL_LABEL = "swarm"
CLOSE_WAIT_S = 1.0

# Counter names in ``BackendCounters`` (the mesh's stats show them under "backend_counters").
OFFERED = "direct_offered"  # offers that carried a listener
ATTEMPTS = "direct_attempts"  # answers that dialled one
LINKS = "direct_links"  # links that switched to the stream (each end counts its own)


def fallback(reason: str) -> str:
    """Counter of links that went over WebRTC for ``reason``."""
    return f"direct_fallback:{reason}"


def refused(reason: str) -> str:
    """Counter of connections or frames the direct path refused for ``reason``."""
    return f"direct_refused:{reason}"


class _SwitchingChannel(DataChannel):
    """The offerer's channel: aiortc's until the answer accepts the direct path, then the
    stream's. The mesh holds this one object (and replaces its ``events``) throughout."""

    def __init__(self, inner: DataChannel) -> None:
        self.events = ChannelEvents()
        self.target: DataChannel = inner
        self.threshold: int | None = None
        self._forward(inner)

    def _forward(self, channel: DataChannel) -> None:
        def live(fire: Callable[[], Callable[..., None]]) -> Callable[..., None]:
            def call(*args: Any) -> None:
                if self.target is channel:
                    fire()(*args)

            return call

        channel.events = ChannelEvents(
            on_open=live(lambda: self.events.on_open),
            on_message=live(lambda: self.events.on_message),
            on_buffered_low=live(lambda: self.events.on_buffered_low),
            on_close=live(lambda: self.events.on_close),
        )

    def switch(self, channel: StreamChannel) -> None:
        self.target.events = ChannelEvents()
        self.target = channel
        self._forward(channel)

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def is_open(self) -> bool:
        return self.target.is_open

    @property
    def buffered_amount(self) -> int:
        return self.target.buffered_amount

    def set_buffered_amount_low_threshold(self, threshold: int) -> None:
        self.threshold = threshold
        self.target.set_buffered_amount_low_threshold(threshold)

    def send(self, data: bytes | str) -> None:
        self.target.send(data)


class DirectBackend(PeerBackend):
    """One link: an aiortc peer connection, and the TLS stream that may replace it."""

    name = NAME

    def __init__(self, config: BackendConfig) -> None:
        super().__init__()
        self._config = config
        self._counters = config.counters
        self.inner = AiortcBackend(config)
        self.inner.on_channel = self._inner_channel
        self.inner.on_failed = self._inner_failed
        self._listener: Listener | None = None
        self._offered: _SwitchingChannel | None = None
        # The answerer's dial, running while aiortc makes its answer (ICE gathering takes
        # about as long as a dial that times out, so a peer out of reach costs nothing).
        self._dialling: asyncio.Task[FrameStream | None] | None = None
        self.channel: StreamChannel | None = None  # set once the link is direct
        self._local_sdp: str | None = None
        self._remote_sdp: str | None = None
        self._inner_closing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def direct(self) -> bool:
        return self.channel is not None

    def _count(self, name: str) -> None:
        self._counters.count(name)

    # -- the wrapped aiortc connection --------------------------------------------------

    def _inner_channel(self, channel: DataChannel) -> None:
        if not self.direct and not self._closed:
            self.on_channel(channel)

    def _inner_failed(self, state: str) -> None:
        if not self.direct and not self._closed:
            self.on_failed(state)

    def _retire_inner(self) -> None:
        """The stream carries the link: aiortc's connection is closed, never cancelled
        (a cancelled aiortc close leaves its transports' tasks running)."""
        if self._inner_closing is None:
            self._inner_closing = asyncio.get_running_loop().create_task(
                self.inner.close(), name="direct-close-aiortc"
            )

    # -- offerer -----------------------------------------------------------------------

    def create_channel(self, label: str) -> DataChannel:
        self._offered = _SwitchingChannel(self.inner.create_channel(label))
        return self._offered

    async def create_offer(self) -> str:
        sdp = await self.inner.create_offer()
        self._local_sdp = sdp
        if self._config.relay_only or self._offered is None:
            return sdp
        try:
            line = await self._listen(sdp)
        except (OSError, AttributeError, SwarmError) as exc:
            # AttributeError: aiortc no longer keeps its certificate where we look.
            self._count(fallback(Reason.DIRECT_UNREACHABLE))
            log.warning("direct path not offered: %s", exc)
            return sdp
        self._count(OFFERED)
        self._local_sdp = direct_sdp.add_session_line(sdp, line)
        return self._local_sdp

    def _listen_host(self, sdp: str) -> str | None:
        configured = self._config.host_addresses
        candidates = (
            sorted(configured, key=lambda a: ":" in a)
            if configured
            else direct_sdp.host_candidate_addresses(sdp)
        )
        for address in candidates:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                continue
            return address
        return None

    async def _listen(self, sdp: str) -> str:
        host = self._listen_host(sdp)
        if host is None:
            raise TransportError(Reason.DIRECT_UNREACHABLE, "no host address to listen on")
        context = direct_tls.server_context(direct_tls.dtls_certificate(self.inner.raw))
        token = secrets.token_hex(16)
        listener = Listener(
            context,
            token,
            self._config.direct_connect_timeout_s,
            lambda reason: self._count(refused(reason)),
        )
        port = await listener.start(host)
        self._listener = listener
        return direct_sdp.offer_line(host, port, token)

    async def _accept_answer(self, sdp: str) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            await self.inner.set_remote_description(sdp, "answer")
            return
        stream = listener.take() if direct_sdp.accepted(sdp) else None
        await listener.close()
        if stream is None:
            if direct_sdp.accepted(sdp):
                # The answer claims a stream our listener never acknowledged.
                self._count(fallback(Reason.DIRECT_REFUSED))
                raise TransportError(Reason.DIRECT_REFUSED, "answer accepts an unknown stream")
            self._count(fallback(Reason.DIRECT_DECLINED))
            await self.inner.set_remote_description(sdp, "answer")
            return
        assert self._offered is not None
        channel = self._adopt(stream, self._offered.label)
        self._offered.switch(channel)
        if self._offered.threshold is not None:
            channel.set_buffered_amount_low_threshold(self._offered.threshold)
        channel.open()

    # -- answerer ----------------------------------------------------------------------

    async def _dial(self, offer_sdp: str) -> FrameStream | None:
        if self._config.relay_only:
            return None
        try:
            offer = direct_sdp.parse_offer(offer_sdp)
        except SwarmError:
            self._count(fallback(Reason.MALFORMED))
            return None
        if offer is None:
            self._count(fallback(Reason.DIRECT_NOT_OFFERED))
            return None
        expected = direct_sdp.sha256_fingerprint(offer_sdp)
        if expected is None:
            self._count(fallback(Reason.FINGERPRINT_MISMATCH))
            return None
        self._count(ATTEMPTS)
        try:
            return await connect(offer, expected, self._config.direct_connect_timeout_s)
        except TransportError as exc:
            self._count(fallback(exc.reason))
            log.info("direct path to %s:%d not used: %s", offer.host, offer.port, exc)
            return None

    async def _dialled(self) -> FrameStream | None:
        dialling, self._dialling = self._dialling, None
        return None if dialling is None else await dialling

    async def create_answer(self) -> str:
        sdp = await self.inner.create_answer()
        stream = await self._dialled()
        if stream is None or stream.lost.done():
            self._local_sdp = sdp
            return sdp
        self._local_sdp = direct_sdp.add_session_line(sdp, direct_sdp.OK_ATTRIBUTE)
        channel = self._adopt(stream, CHANNEL_LABEL)
        self.on_channel(channel)
        channel.open()
        return self._local_sdp

    # -- both ----------------------------------------------------------------------------

    def _adopt(self, stream: FrameStream, label: str) -> StreamChannel:
        channel = StreamChannel(stream, label)
        stream.on_problem = lambda reason: self._count(refused(reason))

        def dropped() -> None:
            if not self._closed:
                self.on_failed("closed")

        channel.on_dropped = dropped
        self.channel = channel
        self._count(LINKS)
        self._retire_inner()
        return channel

    async def set_remote_description(self, sdp: str, kind: str) -> None:
        self._remote_sdp = sdp
        if kind == "answer":
            await self._accept_answer(sdp)
            return
        if self._dialling is None and not self._closed:
            self._dialling = asyncio.get_running_loop().create_task(
                self._dial(sdp), name="direct-dial"
            )
        await self.inner.set_remote_description(sdp, kind)

    async def add_ice_candidate(self, candidate: dict[str, Any]) -> None:
        if not self.direct:
            await self.inner.add_ice_candidate(candidate)

    @property
    def local_sdp(self) -> str | None:
        return self._local_sdp if self._local_sdp is not None else self.inner.local_sdp

    @property
    def remote_sdp(self) -> str | None:
        return self._remote_sdp

    def max_frame_bytes(self) -> int | None:
        return MAX_FRAME if self.direct else self.inner.max_frame_bytes()

    def selected_route(self) -> Route | None:
        if self.channel is None:
            return self.inner.selected_route()
        transport = self.channel.stream.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        remote = transport.get_extra_info("peername") if transport is not None else None
        return Route(
            local_type=ROUTE_TYPE,
            remote_type=ROUTE_TYPE,
            local_address=f"{local[0]}:{local[1]}" if local else "",
            remote_address=f"{remote[0]}:{remote[1]}" if remote else "",
        )

    def gathered_types(self) -> set[str]:
        return self.inner.gathered_types()

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._listener.listening

    async def close(self) -> None:
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        streams: list[FrameStream] = []
        dialling, self._dialling = self._dialling, None
        if dialling is not None:
            dialling.cancel()
            await asyncio.wait([dialling])
            dialled = None if dialling.cancelled() else dialling.result()
            if dialled is not None:
                streams.append(dialled)
        if self.channel is not None:
            self.channel.close()
            streams.append(self.channel.stream)
        for stream in streams:
            stream.abort()
        if streams:
            # The socket is released in connection_lost, a loop turn after the abort.
            await asyncio.wait([s.lost for s in streams], timeout=CLOSE_WAIT_S)
        if self._inner_closing is not None:
            await asyncio.shield(self._inner_closing)
        else:
            await self.inner.close()
