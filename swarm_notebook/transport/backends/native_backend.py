"""The ``native`` backend: libdatachannel (C++) through the ``libdatachannel-py`` bindings.

libdatachannel calls back from its own threads. Rules this module keeps:

* A native callback touches no asyncio object and no mesh state: it only hands its
  arguments to the mesh's loop with ``loop.call_soon_threadsafe`` (the one thread-safe
  entry into a loop). The single exception is setting a new channel's own callbacks,
  which must happen before libdatachannel delivers anything on it.
* Nothing calls into libdatachannel while holding a lock a callback needs. Our callbacks
  take only the GIL, but libdatachannel runs each one under its own callback mutex, and
  ``reset_callbacks()`` (like setting a callback) waits for that mutex while the binding
  keeps the GIL: a callback that is about to run then waits for the GIL forever (seen in
  a close-under-traffic stress, and 2 in 14 runs before). So close never resets
  callbacks: it only calls ``PeerConnection.close()`` (which releases the GIL and drops
  libdatachannel's callbacks itself), in a worker thread so the loop never blocks, and
  events still queued for the loop are discarded there. The last references are dropped
  on the loop, never inside a native thread.
* No call may wait for libdatachannel's worker pool while the binding holds the GIL (a
  worker may be waiting for the GIL to run one of our callbacks): connections get a
  ready-made certificate (``native_cert``) so ``set_local_description`` never waits for
  one to be generated.
* After :meth:`NativeBackend.close` starts, bridged events that were already queued are
  discarded on the loop, so no callback reaches the mesh for a closed link.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import libdatachannel as ldc

from swarm_notebook.transport.backends.base import (
    BackendConfig,
    ChannelEvents,
    DataChannel,
    PeerBackend,
)
from swarm_notebook.transport.backends.native_cert import pem_pair
from swarm_notebook.transport.ice_config import IceServer
from swarm_notebook.transport.ice_path import Route

log = logging.getLogger(__name__)

# The package's stubs shadow this class with a stray ``import Description``: look it up
# at run time so type checkers on 3.13 and 3.11 (no stubs) agree.
Description: Any = vars(ldc)["Description"]

NAME = "native"
GATHER_TIMEOUT_S = 5.0

_CANDIDATE_TYPES = {
    ldc.Candidate.Type.Host: "host",
    ldc.Candidate.Type.ServerReflexive: "srflx",
    ldc.Candidate.Type.PeerReflexive: "prflx",
    ldc.Candidate.Type.Relayed: "relay",
}
_MAX_MESSAGE = re.compile(r"^a=max-message-size:(\d+)", re.MULTILINE)
DEFAULT_REMOTE_MAX_MESSAGE = 64 * 1024
NATIVE_MAX_MESSAGE = 256 * 1024  # what libdatachannel receives (its default) and sends
_TYP = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ (\S+)", re.MULTILINE)


def version() -> str:
    """The installed libdatachannel-py version (shown in benchmarks and stats)."""
    from importlib.metadata import version as dist_version

    return dist_version("libdatachannel-py")


def native_ice_server(server: IceServer) -> ldc.IceServer:
    """libdatachannel's form of one validated server (STUN or TURN over udp/tcp/tls)."""
    if not server.is_turn:
        return ldc.IceServer(server.host, server.port)
    if server.scheme == "turns":
        relay = ldc.IceServer.RelayType.TurnTls
    elif server.transport == "tcp":
        relay = ldc.IceServer.RelayType.TurnTcp
    else:
        relay = ldc.IceServer.RelayType.TurnUdp
    return ldc.IceServer(
        server.host, server.port, server.username or "", server.credential or "", relay
    )


def native_configuration(config: BackendConfig) -> ldc.Configuration:
    """The connection settings; negotiation is driven by the mesh, never automatic."""
    rtc = ldc.Configuration()
    rtc.ice_servers = [native_ice_server(s) for s in config.ice_servers]
    rtc.ice_transport_policy = (
        ldc.TransportPolicy.Relay if config.relay_only else ldc.TransportPolicy.All
    )
    rtc.disable_auto_negotiation = True
    # PEM text, not file names: libdatachannel accepts both, and text keeps the key off disk.
    rtc.certificate_pem_file, rtc.key_pem_file = pem_pair()
    hosts = config.host_addresses
    if hosts is not None and len(hosts) == 1:
        # libjuice binds one address; several are filtered from the SDP instead.
        rtc.bind_address = hosts[0]
    return rtc


def restrict_sdp_hosts(sdp: str, hosts: list[str] | None) -> str:
    """Drop host candidates on addresses not in ``hosts`` (``None`` keeps them all)."""
    if hosts is None:
        return sdp
    kept = []
    for line in sdp.splitlines():
        match = _TYP.match(line)
        if match and match.group(2) == "host" and match.group(1) not in hosts:
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


class _Bridge:
    """Hands native-thread events to one loop, in order; drops them once closed.

    Events queue in a deque (append and popleft are atomic under the GIL) and one drain
    is scheduled per burst, not one loop wake-up per message: under load the wake-ups,
    not the copies, were what a 64 KiB frame cost.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = False
        self._pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._scheduled = False

    def wrap(self, handler: Callable[..., None]) -> Callable[..., None]:
        def from_native(*args: Any) -> None:
            self._pending.append((handler, args))
            if self._scheduled:
                return  # the drain already due will see it (it clears the flag first)
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to tell

        return from_native

    def _drain(self) -> None:
        self._scheduled = False
        pending = self._pending
        while pending:
            handler, args = pending.popleft()
            if self.closed:
                pending.clear()
                return
            try:
                handler(*args)
            except Exception:
                log.exception("native transport callback failed")


class NativeChannel(DataChannel):
    """A libdatachannel ``DataChannel``; its callbacks are set at construction."""

    def __init__(self, channel: ldc.DataChannel, bridge: _Bridge) -> None:
        self.raw: ldc.DataChannel | None = channel
        self.events = ChannelEvents()
        self.send_failures = 0
        self._label = channel.label()
        # Forward through ``events`` at delivery time so the mesh may replace them later.
        channel.on_open(bridge.wrap(lambda: self.events.on_open()))
        channel.on_closed(bridge.wrap(lambda: self.events.on_close()))
        channel.on_message(bridge.wrap(lambda data: self.events.on_message(data)))
        channel.on_buffered_amount_low(bridge.wrap(lambda: self.events.on_buffered_low()))

    @property
    def label(self) -> str:
        return self._label

    @property
    def is_open(self) -> bool:
        return self.raw is not None and self.raw.is_open()

    @property
    def buffered_amount(self) -> int:
        return 0 if self.raw is None else self.raw.buffered_amount()

    def set_buffered_amount_low_threshold(self, threshold: int) -> None:
        if self.raw is not None:
            self.raw.set_buffered_amount_low_threshold(threshold)

    def send(self, data: bytes | str) -> None:
        # The channel closes on libdatachannel's threads, so "open" a moment ago may be
        # closed now: such a send fails with RuntimeError. It is counted, not raised (the
        # close event that follows fails the link, and whoever waits on it learns).
        if self.raw is None:
            self.send_failures += 1
            return
        try:
            self.raw.send(data)
        except RuntimeError as exc:
            self.send_failures += 1
            if self.send_failures == 1:
                log.debug("send on a closing native channel %s: %s", self._label, exc)


class NativeBackend(PeerBackend):
    """One libdatachannel ``PeerConnection`` whose events arrive on the creating loop."""

    name = NAME

    def __init__(self, config: BackendConfig) -> None:
        super().__init__()
        self._hosts = config.host_addresses
        self._bridge = _Bridge(asyncio.get_running_loop())
        self._gathered = asyncio.Event()
        self._channels: list[NativeChannel] = []
        self._local_sdp: str | None = None
        self._remote_sdp: str | None = None
        self._closing: asyncio.Future[None] | None = None
        self._retired: tuple[Any, ...] = ()
        self._pc: ldc.PeerConnection | None = ldc.PeerConnection(native_configuration(config))
        bridge = self._bridge
        self._pc.on_state_change(bridge.wrap(self._state_changed))
        self._pc.on_gathering_state_change(bridge.wrap(self._gathering_changed))
        self._pc.on_data_channel(self._native_channel)

    # Runs on a native thread: wrap the channel (so no message is missed) and pass it on.
    # The list append is atomic under the GIL; it makes close() see this channel too.
    def _native_channel(self, channel: ldc.DataChannel) -> None:
        if self._bridge.closed:
            return  # closing: close() takes the channel down with the connection
        wrapped = NativeChannel(channel, self._bridge)
        self._channels.append(wrapped)
        self._bridge.wrap(self.on_channel_arrived)(wrapped)

    def on_channel_arrived(self, channel: NativeChannel) -> None:
        self.on_channel(channel)

    def _state_changed(self, state: ldc.PeerConnection.State) -> None:
        if state in (ldc.PeerConnection.State.Failed, ldc.PeerConnection.State.Closed):
            self.on_failed(state.name.lower())

    def _gathering_changed(self, state: ldc.PeerConnection.GatheringState) -> None:
        if state is ldc.PeerConnection.GatheringState.Complete:
            self._gathered.set()

    def _live(self) -> ldc.PeerConnection:
        if self._pc is None:
            raise RuntimeError("peer connection closed")
        return self._pc

    def create_channel(self, label: str) -> DataChannel:
        channel = NativeChannel(self._live().create_data_channel(label), self._bridge)
        self._channels.append(channel)
        return channel

    async def _local(self, kind: Description.Type) -> str:
        pc = self._live()
        pc.set_local_description(kind)
        # Whole SDP, as aiortc sends it: wait until every candidate is in it, but not for
        # a STUN/TURN server that does not answer: then send what was gathered (the mesh
        # sees which types are missing and moves on to the next server).
        try:
            await asyncio.wait_for(self._gathered.wait(), GATHER_TIMEOUT_S)
        except TimeoutError:
            log.info("ICE gathering unfinished after %g s; sending what it found", GATHER_TIMEOUT_S)
        desc = self._live().local_description()
        if desc is None:
            raise RuntimeError("no local description after gathering")
        self._local_sdp = restrict_sdp_hosts(str(desc), self._hosts)
        return self._local_sdp

    async def create_offer(self) -> str:
        return await self._local(Description.Type.Offer)

    async def create_answer(self) -> str:
        return await self._local(Description.Type.Answer)

    async def set_remote_description(self, sdp: str, kind: str) -> None:
        types = {"offer": Description.Type.Offer, "answer": Description.Type.Answer}
        self._live().set_remote_description(Description(sdp, types[kind]))
        self._remote_sdp = sdp

    async def add_ice_candidate(self, candidate: dict[str, Any]) -> None:
        text = candidate.get("candidate")
        if not isinstance(text, str) or not text:
            return  # end-of-candidates marker
        if not text.startswith("candidate:"):
            text = "candidate:" + text
        mid = candidate.get("sdpMid")
        self._live().add_remote_candidate(ldc.Candidate(text, mid if isinstance(mid, str) else "0"))

    @property
    def local_sdp(self) -> str | None:
        return self._local_sdp

    @property
    def remote_sdp(self) -> str | None:
        return self._remote_sdp

    def max_frame_bytes(self) -> int | None:
        # Read from the SDP text, not the binding (no call that could wait on its threads).
        # Without the attribute the peer takes 64 KiB (RFC 8841); aiortc says 65536.
        match = _MAX_MESSAGE.search(self._remote_sdp or "")
        remote = int(match.group(1)) if match else DEFAULT_REMOTE_MAX_MESSAGE
        if remote == 0:  # "any size" by RFC 8841
            remote = NATIVE_MAX_MESSAGE
        return min(remote, NATIVE_MAX_MESSAGE)

    def selected_route(self) -> Route | None:
        if self._pc is None:
            return None
        local, remote = ldc.Candidate(), ldc.Candidate()
        if not self._pc.get_selected_candidate_pair(local, remote):
            return None
        return Route(
            local_type=_CANDIDATE_TYPES.get(local.type(), "host"),
            remote_type=_CANDIDATE_TYPES.get(remote.type(), "host"),
            local_address=f"{local.address()}:{local.port()}",
            remote_address=f"{remote.address()}:{remote.port()}",
        )

    def gathered_types(self) -> set[str]:
        return {typ for _, typ in _TYP.findall(self._local_sdp or "")}

    async def close(self) -> None:
        if self._closing is None:
            self._bridge.closed = True
            pc, channels = self._pc, [c.raw for c in self._channels]
            self._pc = None
            for channel in self._channels:
                channel.raw = None
            loop = asyncio.get_running_loop()
            # Kept here so the last references drop on the loop, never on a native thread.
            self._retired = (pc, channels)
            self._closing = loop.run_in_executor(None, _close_native, pc, channels)
        # shield: a cancelled close must still finish (and keep the references alive).
        await asyncio.shield(self._closing)


def _close_native(pc: ldc.PeerConnection | None, channels: list[ldc.DataChannel | None]) -> None:
    """Worker thread: close the connection (libdatachannel drops its callbacks itself)."""
    if pc is not None:
        pc.close()
