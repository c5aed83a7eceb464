"""Limits and settings of the signaling server, with defaults sized for a lab or a team."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm_notebook.protocol.signaling import MAX_ROOM_LENGTH
from swarm_notebook.signaling.quotas import QuotaLimits

DEFAULT_PORT = 8765


@dataclass(frozen=True)
class SignalingLimits:
    """Every bound the server enforces; exceeding one is a counted, explained rejection.

    ``max_frame_bytes`` is the largest text frame accepted (answered with ``too-large``
    and a close above it); ``hard_frame_bytes`` is where aiohttp itself stops reading
    (close code 1009) so the server never buffers more than that per socket.
    """

    max_frame_bytes: int = 64 * 1024
    hard_frame_multiple: int = 4
    messages_per_second: float = 50.0
    burst: int = 100
    # Rate violations tolerated (refilling at one per second) before the socket is closed.
    rate_strikes: int = 10
    # Wrong-schema / not-joined frames tolerated before the socket is closed.
    protocol_strikes: int = 10
    peers_per_room: int = 64
    max_rooms: int = 1000
    max_room_length: int = MAX_ROOM_LENGTH
    max_connections: int = 10_000
    # Seconds a socket may take to join; then it is closed (``join-timeout``).
    join_timeout: float = 5.0
    # Frames queued to one socket before it counts as a slow consumer.
    send_queue: int = 256
    heartbeat: float | None = 30.0
    # What one remote address may hold (connections, pending sockets, rooms, peers per
    # room, secret guesses): see signaling/quotas.py.
    per_address: QuotaLimits = field(default_factory=QuotaLimits)

    @property
    def hard_frame_bytes(self) -> int:
        return self.max_frame_bytes * self.hard_frame_multiple

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "hard_frame_multiple",
            "burst",
            "rate_strikes",
            "protocol_strikes",
            "peers_per_room",
            "max_rooms",
            "max_room_length",
            "max_connections",
            "send_queue",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.messages_per_second <= 0 or self.join_timeout <= 0:
            raise ValueError("messages_per_second and join_timeout must be > 0")


@dataclass(frozen=True)
class SignalingConfig:
    """Where the server listens and who may join.

    ``secret`` applies to every room; ``room_secrets`` overrides it per room (a room
    listed there needs its own secret even when ``secret`` is None). With ``certfile``
    and ``keyfile`` (PEM) the server speaks TLS and its URL is ``wss://``.

    >>> SignalingConfig(port=0, secret="s3cret").secret_for("lab")
    's3cret'
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    secret: str | None = None
    room_secrets: Mapping[str, str] = field(default_factory=dict)
    limits: SignalingLimits = field(default_factory=SignalingLimits)
    # How long close() waits for clients to receive Shutdown before dropping them.
    shutdown_timeout: float = 3.0
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("a keyfile needs a certfile (PEM certificate chain)")

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def secret_for(self, room: str) -> str | None:
        return self.room_secrets.get(room, self.secret)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plain ``ws://``.

        Raises ``ValueError`` naming the file when the certificate or key cannot be loaded.
        """
        if self.certfile is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS certificate {self.certfile!r}"
                f" / key {self.keyfile or self.certfile!r}: {exc}"
            ) from exc
        return context
