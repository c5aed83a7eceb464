"""Short reason codes carried by ``Error`` frames (server) and ``SignalingError`` (client)."""

from __future__ import annotations

from typing import Final

MALFORMED: Final = "malformed"  # not JSON text (garbage, binary, truncated)
WRONG_SCHEMA: Final = "wrong-schema"  # JSON, but not a message the server accepts
TOO_LARGE: Final = "too-large"
RATE_LIMITED: Final = "rate-limited"
NOT_JOINED: Final = "not-joined"
ALREADY_JOINED: Final = "already-joined"
UNKNOWN_PEER: Final = "unknown-peer"
PEER_BUSY: Final = "peer-busy"  # the addressed peer is not reading its frames
BAD_SIGNATURE: Final = "bad-signature"  # the join does not prove the peer id's key
BAD_SECRET: Final = "bad-secret"
BAD_ROOM: Final = "bad-room"
ROOM_FULL: Final = "room-full"
TOO_MANY_ROOMS: Final = "too-many-rooms"
TOO_MANY_CONNECTIONS: Final = "too-many-connections"
JOIN_TIMEOUT: Final = "join-timeout"
REPLACED: Final = "replaced"  # another socket proved the same key and took over the id
SLOW_CONSUMER: Final = "slow-consumer"  # counted only: the socket is dropped, not told
ABUSE: Final = "abuse"  # counted only: too many strikes, the socket is closed

# Refusals a client must not retry: retrying cannot change the answer.
FINAL_REFUSALS: Final = frozenset({BAD_SIGNATURE, BAD_SECRET, BAD_ROOM, REPLACED})
