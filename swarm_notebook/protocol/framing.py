"""Chunk framing for links whose messages are capped (aiortc: 64 KiB).

Every frame starts with one kind byte. ``WHOLE`` frames carry a complete encoded
envelope; ``CHUNK`` frames carry a piece of a larger one::

    CHUNK: kind(1) | transfer id(8) | index(4) | count(4) | payload

Chunks of one transfer arrive in order (the channel is ordered and reliable) but chunks
of different transfers may interleave, so a small message such as a heartbeat is never
stuck behind a 50 MB transfer.

Memory is bounded three ways: per message, per link, and across every link of a peer
(one :class:`ReassemblyPool`), so many links cannot each pin their own share. A transfer
that stops making progress for ``timeout_s`` is dropped: the clock restarts with every
chunk, so a large message over a slow, lossy link is never cut off while it still flows.
"""

from __future__ import annotations

import struct
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol.shared_frame import SharedFrame
from swarm_notebook.reasons import Reason

WHOLE = 0x00
CHUNK = 0x01
_CHUNK_HEADER = struct.Struct(">BQII")
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size
DEFAULT_FRAME_SIZE = 64 * 1024


def frame_message(
    payload: bytes | Sequence[bytes | bytearray | memoryview],
    transfer_id: int,
    frame_size: int = DEFAULT_FRAME_SIZE,
) -> Iterator[bytes]:
    """Split an encoded envelope into frames no larger than ``frame_size`` bytes.

    ``payload`` may be one buffer or the parts of one message (``oob.encode``): chunks
    are cut from the parts as they are, so the message is never joined into one copy.
    """
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    if total + 1 <= frame_size:
        yield b"".join([bytes((WHOLE,)), *views])
        return
    piece = frame_size - CHUNK_HEADER_SIZE
    count = -(-total // piece)
    pieces = _pieces(views, piece)
    for index in range(count):
        header = _CHUNK_HEADER.pack(CHUNK, transfer_id, index, count)
        yield b"".join([header, *next(pieces)])


def _pieces(views: list[memoryview], piece: int) -> Iterator[list[memoryview]]:
    """Consecutive slices of ``piece`` bytes (the last one shorter) across ``views``."""
    taken: list[memoryview] = []
    room = piece
    for view in views:
        start = 0
        while start < view.nbytes:
            n = min(room, view.nbytes - start)
            taken.append(view[start : start + n])
            start += n
            room -= n
            if room == 0:
                yield taken
                taken, room = [], piece
    if taken:
        yield taken


def chunk_transfer_id(frame: bytes) -> int | None:
    """The transfer id of a ``CHUNK`` frame, ``None`` for anything else."""
    if len(frame) >= CHUNK_HEADER_SIZE and frame[0] == CHUNK:
        return int(_CHUNK_HEADER.unpack_from(frame)[1])
    return None


@dataclass
class _Transfer:
    count: int
    last_progress: float
    # Chunks are copied in as they arrive, so each frame is freed at once and the whole
    # message never exists twice (kept frames plus their join held 2x its size). Growing
    # a large bytearray moves pages (mremap), not bytes. A large message may be gathered
    # in a memfd instead (``ReassemblyLimits.shared_min_bytes``).
    data: bytearray | SharedFrame = field(default_factory=bytearray)
    received: int = 0
    size: int = 0


@dataclass
class ReassemblyLimits:
    # One message may be large (a DataFrame); what a peer can make us hold unfinished is
    # bounded per link and across all links (``max_total_pending_bytes``), and a transfer
    # that makes no progress for ``timeout_s`` is dropped.
    max_message_bytes: int = 128 * 1024 * 1024
    max_pending_bytes: int = 160 * 1024 * 1024
    max_total_pending_bytes: int = 256 * 1024 * 1024
    max_transfers: int = 64
    timeout_s: float = 30.0
    # Messages announcing at least this many bytes are reassembled in a memfd a sandbox
    # child can map instead of a copy (``shared_frame``); None: always in a bytearray.
    # Off unless this peer runs a sandbox pool: each live such frame holds two fds.
    shared_min_bytes: int | None = None


class ReassemblyPool:
    """Unfinished bytes held across every link: one budget shared by all reassemblers.

    When it is full, room is taken from the link holding the most, as long as that link
    holds more than the one asking: a greedy peer cannot starve the others, it only ends
    up with an equal share. ``on_evict(reassembler, transfer_id)`` reports each transfer
    dropped that way so its sender can be told.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        self.evicted = 0
        self.on_evict: Callable[[Reassembler, int], None] = lambda reassembler, tid: None
        self._members: weakref.WeakSet[Reassembler] = weakref.WeakSet()

    def fits(self, n: int) -> bool:
        return self.pending_bytes + n <= self.max_bytes

    def join(self, reassembler: Reassembler) -> None:
        self._members.add(reassembler)

    def make_room(self, n: int, asking: Reassembler) -> bool:
        while not self.fits(n):
            greediest = max(self._members, key=lambda r: r.pending_bytes, default=None)
            if (
                greediest is None
                or greediest is asking
                or greediest.pending_bytes <= asking.pending_bytes + n
            ):
                return False
            transfer_id = greediest.largest_transfer()
            if transfer_id is None:
                return False
            greediest.refuse(transfer_id)
            self.evicted += 1
            self.on_evict(greediest, transfer_id)
        return True


class Reassembler:
    """Rebuilds chunked messages from one peer, within fixed memory and time bounds.

    ``feed`` returns a complete payload, ``None`` while a transfer is incomplete, and
    raises ``ProtocolError`` for anything that breaks the rules (the offending transfer
    is dropped, so one bad frame cannot pin memory).
    """

    # Transfers refused or expired are remembered (bounded) so their remaining chunks are
    # dropped quietly: one refusal per transfer, not one per chunk still on its way.
    MAX_REMEMBERED_DROPS = 256

    def __init__(
        self, limits: ReassemblyLimits | None = None, pool: ReassemblyPool | None = None
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self.pool = pool or ReassemblyPool(self.limits.max_total_pending_bytes)
        self.pool.join(self)
        self._transfers: dict[int, _Transfer] = {}
        self._pending_bytes = 0
        self._dropped: OrderedDict[int, None] = OrderedDict()
        self.expired = 0
        self.discarded_chunks = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_transfers(self) -> int:
        return len(self._transfers)

    def feed(self, frame: bytes, now: float) -> bytes | bytearray | SharedFrame | None:
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
        # A view, not a slice: slicing would copy every chunk once more.
        payload = memoryview(frame)[CHUNK_HEADER_SIZE:]
        transfer = self._transfers.get(transfer_id)
        if transfer is None and index != 0 and transfer_id in self._dropped:
            self.discarded_chunks += 1
            if index + 1 >= count:
                self._dropped.pop(transfer_id, None)
            return None
        if transfer is None:
            self._dropped.pop(transfer_id, None)
            if index != 0:
                raise ProtocolError(
                    Reason.CHUNK_OUT_OF_ORDER, f"transfer {transfer_id} starts at {index}"
                )
            if count < 2:
                raise ProtocolError(Reason.BAD_CHUNK_COUNT, f"count {count}")
            if count * (len(frame) - CHUNK_HEADER_SIZE) > 2 * self.limits.max_message_bytes:
                self._refuse(transfer_id, index, count)
                raise ProtocolError(Reason.OVERSIZED, f"announced {count} chunks")
            if len(self._transfers) >= self.limits.max_transfers:
                self._refuse(transfer_id, index, count)
                raise ProtocolError(Reason.TOO_MANY_TRANSFERS, f"{len(self._transfers)} incomplete")
            transfer = _Transfer(count=count, last_progress=now)
            announced = count * len(payload)
            shared_min = self.limits.shared_min_bytes
            if shared_min is not None and announced >= shared_min:
                transfer.data = SharedFrame.create(min(announced, self.limits.max_message_bytes))
            self._transfers[transfer_id] = transfer
        elif index != transfer.received or count != transfer.count:
            self._refuse(transfer_id, index, count)
            raise ProtocolError(Reason.CHUNK_OUT_OF_ORDER, f"transfer {transfer_id} index {index}")
        if transfer.size + len(payload) > self.limits.max_message_bytes:
            self._refuse(transfer_id, index, count)
            raise ProtocolError(Reason.OVERSIZED, f"transfer {transfer_id} exceeds message limit")
        if self._pending_bytes + len(payload) > self.limits.max_pending_bytes:
            self._refuse(transfer_id, index, count)
            raise ProtocolError(Reason.REASSEMBLY_FULL, f"{self._pending_bytes} bytes pending")
        if not self.pool.make_room(len(payload), self):
            self._refuse(transfer_id, index, count)
            raise ProtocolError(
                Reason.REASSEMBLY_FULL, f"{self.pool.pending_bytes} bytes pending on all links"
            )
        if isinstance(transfer.data, SharedFrame):
            transfer.data.put(transfer.size, payload)
        else:
            transfer.data += payload
        transfer.received += 1
        transfer.size += len(payload)
        transfer.last_progress = now
        self._pending_bytes += len(payload)
        self.pool.pending_bytes += len(payload)
        if transfer.received < transfer.count:
            return None
        self._drop(transfer_id)
        if isinstance(transfer.data, SharedFrame):
            transfer.data.finish(transfer.size)
        return transfer.data

    def expire(self, now: float) -> list[int]:
        """Drop transfers with no progress for the timeout; returns their ids."""
        stale = [
            tid
            for tid, t in self._transfers.items()
            if now - t.last_progress > self.limits.timeout_s
        ]
        for tid in stale:
            self._refuse(tid, 0, 2)
        self.expired += len(stale)
        return stale

    def clear(self) -> None:
        self.pool.pending_bytes -= self._pending_bytes
        self._transfers.clear()
        self._pending_bytes = 0

    def largest_transfer(self) -> int | None:
        return max(self._transfers, key=lambda t: self._transfers[t].size, default=None)

    def refuse(self, transfer_id: int) -> None:
        """Drop an unfinished transfer; chunks of it still arriving are dropped quietly."""
        self._refuse(transfer_id, 0, 2)

    def _refuse(self, transfer_id: int, index: int, count: int) -> None:
        self._drop(transfer_id)
        if index + 1 < count:  # more chunks of it are on their way
            self._dropped[transfer_id] = None
            while len(self._dropped) > self.MAX_REMEMBERED_DROPS:
                self._dropped.popitem(last=False)

    def _drop(self, transfer_id: int) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            self._pending_bytes -= transfer.size
            self.pool.pending_bytes -= transfer.size
