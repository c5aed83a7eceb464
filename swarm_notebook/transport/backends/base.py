"""The interface the mesh uses for one peer connection and its one data channel.

Everything here is called on the mesh's event loop, and every callback a backend fires
runs on that loop too (a backend whose library calls back from other threads bridges them
first). SDP is exchanged whole, after gathering (no trickle from our side); remote
candidates may still be added.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarm_notebook.transport.ice_config import IceServer
from swarm_notebook.transport.ice_path import Route


@dataclass
class BackendCounters:
    """What the backends of one mesh count (e.g. direct-path attempts and fallbacks).

    One per mesh, handed to each of its links: nothing is counted in module state.
    """

    by_name: Counter[str] = field(default_factory=Counter)

    def count(self, name: str) -> None:
        self.by_name[name] += 1


@dataclass
class BackendConfig:
    """What a new peer connection needs to know; the same for every backend."""

    ice_servers: list[IceServer] = field(default_factory=list)
    relay_only: bool = False
    # ICE host candidates to offer (None: every interface); see ``ice_hosts``.
    host_addresses: list[str] | None = None
    # The ``direct`` backend: how long an answerer tries the offerer's TLS listener
    # before it falls back to WebRTC.
    direct_connect_timeout_s: float = 1.5
    counters: BackendCounters = field(default_factory=BackendCounters)


@dataclass
class ChannelEvents:
    """Callbacks of a data channel; each runs on the mesh's loop and must not raise."""

    on_open: Callable[[], None] = lambda: None
    on_message: Callable[[bytes | str], None] = lambda data: None
    on_buffered_low: Callable[[], None] = lambda: None
    on_close: Callable[[], None] = lambda: None


class DataChannel(abc.ABC):
    """One ordered, reliable data channel."""

    events: ChannelEvents

    @property
    @abc.abstractmethod
    def label(self) -> str: ...

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @property
    @abc.abstractmethod
    def buffered_amount(self) -> int: ...

    @abc.abstractmethod
    def set_buffered_amount_low_threshold(self, threshold: int) -> None: ...

    @abc.abstractmethod
    def send(self, data: bytes | str) -> None:
        """Queue ``data`` as one message (never blocks); the mesh sends binary only."""


class PeerBackend(abc.ABC):
    """One peer connection. ``on_channel`` and ``on_failed`` are set by the mesh."""

    name: str = ""

    def __init__(self) -> None:
        # The answerer learns its channel from the offerer; fired once per channel.
        self.on_channel: Callable[[DataChannel], None] = lambda channel: None
        # The connection failed or was closed by the other side: (state name).
        self.on_failed: Callable[[str], None] = lambda state: None

    @abc.abstractmethod
    def create_channel(self, label: str) -> DataChannel:
        """The offerer's data channel (before :meth:`create_offer`)."""

    @abc.abstractmethod
    async def create_offer(self) -> str:
        """Set and return the local offer SDP, candidates gathered."""

    @abc.abstractmethod
    async def create_answer(self) -> str:
        """Set and return the local answer SDP (after the remote offer), candidates gathered."""

    @abc.abstractmethod
    async def set_remote_description(self, sdp: str, kind: str) -> None:
        """``kind`` is ``"offer"`` or ``"answer"``."""

    @abc.abstractmethod
    async def add_ice_candidate(self, candidate: dict[str, Any]) -> None:
        """A remote candidate as signalled: ``candidate``, ``sdpMid``, ``sdpMLineIndex``."""

    @property
    @abc.abstractmethod
    def local_sdp(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def remote_sdp(self) -> str | None: ...

    def max_frame_bytes(self) -> int | None:
        """Largest message this link may send, once the remote SDP is known; ``None``:
        the mesh's configured frame size (aiortc, which caps messages at 64 KiB)."""
        return None

    @abc.abstractmethod
    def selected_route(self) -> Route | None:
        """The nominated candidate pair, ``None`` until there is one."""

    @abc.abstractmethod
    def gathered_types(self) -> set[str]:
        """Candidate types this end gathered (``host``, ``srflx``, ``relay``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the channel and connection; no callback fires after this returns."""
