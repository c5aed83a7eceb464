"""The aiortc backend: ``RTCPeerConnection`` objects bound to the mesh's own loop."""

from __future__ import annotations

from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from swarm_notebook.transport.backends.base import (
    BackendConfig,
    ChannelEvents,
    DataChannel,
    PeerBackend,
)
from swarm_notebook.transport.ice_hosts import restrict_host_candidates
from swarm_notebook.transport.ice_path import Route, gathered_types, selected_route
from swarm_notebook.transport.socket_buffers import widen_ice_sockets

NAME = "aiortc"


def rtc_configuration(config: BackendConfig) -> RTCConfiguration:
    """Always an explicit server list: with None, aiortc contacts a public STUN server."""
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
            for s in config.ice_servers
        ],
        iceTransportPolicy=(
            RTCIceTransportPolicy.RELAY if config.relay_only else RTCIceTransportPolicy.ALL
        ),
    )


def prepare(host_addresses: list[str] | None) -> None:
    """Process-wide setup before the first link: aioice reads host addresses globally."""
    if host_addresses is not None:
        restrict_host_candidates(host_addresses)


class AiortcChannel(DataChannel):
    def __init__(self, channel: RTCDataChannel) -> None:
        self.raw = channel
        self.events = ChannelEvents()

        # aiortc emits these synchronously on the loop: forward through ``events`` so
        # the mesh may replace them after the channel exists.
        @channel.on("open")
        def _opened() -> None:
            self.events.on_open()

        @channel.on("message")
        def _message(data: bytes | str) -> None:
            self.events.on_message(data)

        @channel.on("bufferedamountlow")
        def _low() -> None:
            self.events.on_buffered_low()

        @channel.on("close")
        def _closed() -> None:
            self.events.on_close()

    @property
    def label(self) -> str:
        return str(self.raw.label)

    @property
    def is_open(self) -> bool:
        return bool(self.raw.readyState == "open")

    @property
    def buffered_amount(self) -> int:
        return int(self.raw.bufferedAmount)

    def set_buffered_amount_low_threshold(self, threshold: int) -> None:
        self.raw.bufferedAmountLowThreshold = threshold

    def send(self, data: bytes | str) -> None:
        self.raw.send(data)


class AiortcBackend(PeerBackend):
    """One ``RTCPeerConnection``; must be made and used on the mesh's loop."""

    name = NAME

    def __init__(self, config: BackendConfig) -> None:
        super().__init__()
        self.raw = RTCPeerConnection(rtc_configuration(config))
        pc = self.raw

        @pc.on("connectionstatechange")
        def _state_changed() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.on_failed(str(pc.connectionState))

        @pc.on("datachannel")
        def _on_channel(channel: RTCDataChannel) -> None:
            self.on_channel(AiortcChannel(channel))

    def create_channel(self, label: str) -> DataChannel:
        return AiortcChannel(self.raw.createDataChannel(label, ordered=True))

    async def create_offer(self) -> str:
        await self.raw.setLocalDescription(await self.raw.createOffer())
        widen_ice_sockets(self.raw)  # gathering made the sockets
        return str(self.raw.localDescription.sdp)

    async def create_answer(self) -> str:
        await self.raw.setLocalDescription(await self.raw.createAnswer())
        widen_ice_sockets(self.raw)
        return str(self.raw.localDescription.sdp)

    async def set_remote_description(self, sdp: str, kind: str) -> None:
        await self.raw.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))

    async def add_ice_candidate(self, candidate: dict[str, Any]) -> None:
        text = candidate.get("candidate")
        if not isinstance(text, str) or not text:
            return  # end-of-candidates marker
        ice = candidate_from_sdp(text.removeprefix("candidate:"))
        ice.sdpMid = candidate.get("sdpMid")
        ice.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await self.raw.addIceCandidate(ice)

    @property
    def local_sdp(self) -> str | None:
        desc = self.raw.localDescription
        return None if desc is None else str(desc.sdp)

    @property
    def remote_sdp(self) -> str | None:
        desc = self.raw.remoteDescription
        return None if desc is None else str(desc.sdp)

    def selected_route(self) -> Route | None:
        return selected_route(self.raw)

    def gathered_types(self) -> set[str]:
        return gathered_types(self.raw)

    async def close(self) -> None:
        await self.raw.close()
