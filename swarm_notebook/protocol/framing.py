"""Chunk framing for links whose messages are capped (aiortc: 64 KiB).

Every frame starts with one kind byte. ``WHOLE`` frames carry a complete encoded
envelope; ``CHUNK`` frames carry a piece of a larger one::

    CHUNK: kind(1) | transfer id(8) | index(4) | count(4) | payload

Chunks of one transfer arrive in order (the channel is ordered and reliable) but chunks
of different transfers may interleave, so a small message such as a heartbeat is never
stuck behind a 50 MB transfer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from swarm_notebook.errors import ProtocolError
from swarm_notebook.reasons import Reason

WHOLE = 0x00
CHUNK = 0x01
_CHUNK_HEADER = struct.Struct(">BQII")
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size
DEFAULT_FRAME_SIZE = 64 * 1024


def frame_message(
    payload: bytes, transfer_id: int, frame_size: int = DEFAULT_FRAME_SIZE
) -> Iterator[bytes]:
    """Split an encoded envelope into frames no larger than ``frame_size`` bytes."""
    if len(payload) + 1 <= frame_size:
        yield bytes((WHOLE,)) + payload
        return
    piece = frame_size - CHUNK_HEADER_SIZE
    count = -(-len(payload) // piece)
    view = memoryview(payload)
    for index in range(count):
        header = _CHUNK_HEADER.pack(CHUNK, transfer_id, index, count)
        yield header + view[index * piece : (index + 1) * piece]


@dataclass
class _Transfer:
    count: int
    started: float
    parts: list[memoryview] = field(default_factory=list)
    size: int = 0


@dataclass
class ReassemblyLimits:
    # One message may be large (a DataFrame); what a peer can make us hold unfinished is
    # bounded per link, and a stalled transfer is dropped after ``timeout_s``.
    max_message_bytes: int = 128 * 1024 * 1024
    max_pending_bytes: int = 160 * 1024 * 1024
    max_transfers: int = 64
    timeout_s: float = 30.0


class Reassembler:
    """Rebuilds chunked messages from one peer, within fixed memory and time bounds.

    ``feed`` returns a complete payload, ``None`` while a transfer is incomplete, and
    raises ``ProtocolError`` for anything that breaks the rules (the offending transfer
    is dropped, so one bad frame cannot pin memory).
    """

    def __init__(self, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits or ReassemblyLimits()
        self._transfers: dict[int, _Transfer] = {}
        self._pending_bytes = 0
        self.expired = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def feed(self, frame: bytes, now: float) -> bytes | None:
        if not frame:
            raise ProtocolError(Reason.EMPTY_FRAME)
        kind = frame[0]
        if kind == WHOLE:
            if len(frame) - 1 > self.limits.max_message_bytes:
                raise ProtocolError(Reason.OVERSIZED, f"{len(frame) - 1} bytes")
            return frame[1:]
        if kind != CHUNK:
            raise ProtocolError(Reason.BAD_FRAME_KIND, f"kind byte {kind}")
        if len(frame) <= CHUNK_HEADER_SIZE:
            raise ProtocolError(Reason.TRUNCATED_CHUNK, f"{len(frame)} bytes")
        _, transfer_id, index, count = _CHUNK_HEADER.unpack_from(frame)
        # A view, not a slice: slicing would copy every chunk once more before the join.
        payload = memoryview(frame)[CHUNK_HEADER_SIZE:]
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            if index != 0:
                raise ProtocolError(
                    Reason.CHUNK_OUT_OF_ORDER, f"transfer {transfer_id} starts at {index}"
                )
            if count < 2:
                raise ProtocolError(Reason.BAD_CHUNK_COUNT, f"count {count}")
            if count * (len(frame) - CHUNK_HEADER_SIZE) > 2 * self.limits.max_message_bytes:
                raise ProtocolError(Reason.OVERSIZED, f"announced {count} chunks")
            if len(self._transfers) >= self.limits.max_transfers:
                raise ProtocolError(Reason.TOO_MANY_TRANSFERS, f"{len(self._transfers)} incomplete")
            transfer = _Transfer(count=count, started=now)
            self._transfers[transfer_id] = transfer
        elif index != len(transfer.parts) or count != transfer.count:
            self._drop(transfer_id)
            raise ProtocolError(Reason.CHUNK_OUT_OF_ORDER, f"transfer {transfer_id} index {index}")
        if transfer.size + len(payload) > self.limits.max_message_bytes:
            self._drop(transfer_id)
            raise ProtocolError(Reason.OVERSIZED, f"transfer {transfer_id} exceeds message limit")
        if self._pending_bytes + len(payload) > self.limits.max_pending_bytes:
            self._drop(transfer_id)
            raise ProtocolError(Reason.REASSEMBLY_FULL, f"{self._pending_bytes} bytes pending")
        transfer.parts.append(payload)
        transfer.size += len(payload)
        self._pending_bytes += len(payload)
        if len(transfer.parts) < transfer.count:
            return None
        self._drop(transfer_id)
        return b"".join(transfer.parts)

    def expire(self, now: float) -> int:
        """Drop transfers older than the timeout; returns how many were dropped."""
        stale = [
            tid for tid, t in self._transfers.items() if now - t.started > self.limits.timeout_s
        ]
        for tid in stale:
            self._drop(tid)
        self.expired += len(stale)
        return len(stale)

    def clear(self) -> None:
        self._transfers.clear()
        self._pending_bytes = 0

    def _drop(self, transfer_id: int) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            self._pending_bytes -= transfer.size
