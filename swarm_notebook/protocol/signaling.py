"""Messages between a peer and the signaling server (JSON text frames over a WebSocket).

Flow::

    server -> client  Challenge(nonce)                      on connect
    client -> server  Join(room, peer_id, signature, secret_proof)
    server -> client  Joined(room, peer_id, peers, ice_servers?, ice_expires?)  or Error + close
    client -> server  RefreshIce()                          new TURN credentials, please
    server -> client  IceServers(ice_servers, ice_expires)  the answer (also sent unasked)
    server -> client  PeerJoined(peer_id) / PeerLeft(peer_id)
    client -> server  Signal(to, data)                      offer / answer / candidate
    server -> client  Signal(from_, data)                   ``from`` stamped from the socket
    server -> client  Error(reason, message)                a limit or a bad frame
    server -> client  Shutdown(message)                     the server is going away

``signature`` signs ``join_payload(nonce, room, peer_id)`` with the peer's identity key;
``secret_proof`` is ``secret_proof(secret, nonce, peer_id)`` (HMAC-SHA256) when the room
has a secret, so the secret itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec

JOIN_CONTEXT = b"swarm-notebook/signaling-join/v1\x00"
MAX_ROOM_LENGTH = 128


class Challenge(msgspec.Struct, tag="challenge", tag_field="type"):
    nonce: str  # hex


class Join(msgspec.Struct, tag="join", tag_field="type"):
    room: str
    peer_id: str
    signature: str  # hex of Ed25519 signature over join_payload(...)
    secret_proof: str | None = None  # hex HMAC, only when the room has a secret


class Joined(msgspec.Struct, tag="joined", tag_field="type", omit_defaults=True):
    room: str
    peer_id: str
    peers: list[str]
    # ICE servers the server issues (TURN credentials valid until ``ice_expires``, Unix
    # seconds); absent when the server hands none out.
    ice_servers: list[dict[str, Any]] | None = None
    ice_expires: float | None = None


class RefreshIce(msgspec.Struct, tag="refresh-ice", tag_field="type"):
    """Asks for fresh TURN credentials before the issued ones expire."""


class IceServers(msgspec.Struct, tag="ice-servers", tag_field="type"):
    ice_servers: list[dict[str, Any]]
    ice_expires: float | None = None


class PeerJoined(msgspec.Struct, tag="peer-joined", tag_field="type"):
    peer_id: str


class PeerLeft(msgspec.Struct, tag="peer-left", tag_field="type"):
    peer_id: str


class Signal(msgspec.Struct, tag="signal", tag_field="type", omit_defaults=True):
    """WebRTC signalling data. Clients set ``to``; the server sets ``from_``."""

    data: dict[str, Any]
    to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


class Error(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    reason: str
    message: str
    peer: str | None = None  # the addressed peer, for errors about a signal (unknown-peer)


class Shutdown(msgspec.Struct, tag="shutdown", tag_field="type"):
    message: str = "server shutting down"


ClientMessage = Join | Signal | RefreshIce
ServerMessage = (
    Challenge | Joined | PeerJoined | PeerLeft | Signal | Error | Shutdown | IceServers
)

_client_decoder = msgspec.json.Decoder(ClientMessage)
_server_decoder = msgspec.json.Decoder(ServerMessage)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> str:
    return _encoder.encode(message).decode("utf-8")


def decode_client_message(data: str | bytes) -> Join | Signal | RefreshIce:
    """Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on a bad frame."""
    try:
        return _client_decoder.decode(data)
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _malformed(exc) from exc


def decode_server_message(
    data: str | bytes,
) -> Challenge | Joined | PeerJoined | PeerLeft | Signal | Error | Shutdown | IceServers:
    """Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` on a bad frame."""
    try:
        return _server_decoder.decode(data)
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _malformed(exc) from exc


def _malformed(exc: Exception) -> msgspec.DecodeError:
    # msgspec raises these itself (nesting deeper than the interpreter's limit, invalid
    # UTF-8 in bytes); callers handle bad frames as DecodeError, so report them as one.
    return msgspec.DecodeError(f"{type(exc).__name__}: {str(exc)[:160]}")


def join_payload(nonce_hex: str, room: str, peer_id: str) -> bytes:
    return JOIN_CONTEXT + f"{nonce_hex}\x00{room}\x00{peer_id}".encode()


def secret_proof(secret: str, nonce_hex: str, peer_id: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"{nonce_hex}\x00{peer_id}".encode(), hashlib.sha256)
    return mac.hexdigest()
