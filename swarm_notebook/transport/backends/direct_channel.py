"""A data channel over one TLS stream: length-prefixed frames, one per message.

Each frame is a 4-byte big-endian length and the payload; the top bit of the length
marks a text message (the mesh sends binary only, but a channel keeps the difference).
A frame may carry at most ``MAX_FRAME`` bytes: a longer one is refused, counted, and the
stream closed, since nothing after it can be trusted to be in step.

Back-pressure is the transport's own write buffer: ``buffered_amount`` is its size and
the transport's low-water mark is the channel's low threshold, so ``resume_writing``
is exactly WebRTC's ``bufferedamountlow``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from collections.abc import Callable
from typing import Any

from swarm_notebook.errors import PeerUnavailable, ProtocolError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.base import ChannelEvents, DataChannel

log = logging.getLogger(__name__)

MAX_FRAME = 1024 * 1024
MAX_TOKEN_FRAME = 64  # the only frame a connection may send before it is authenticated
# What an authenticated stream may hold before its channel opens (the answerer's hello
# and proof are a few hundred bytes; the offerer opens once the answer arrives).
MAX_HELD = 4 * MAX_FRAME
ACK = b"\x06"
_HEADER = struct.Struct(">I")
_TEXT = 0x8000_0000
_SMALL = 16 * 1024  # below this, header and payload go out as one write


class Mode(enum.Enum):
    TOKEN = "token"  # the listener's side: the first frame must be the token
    ACK = "ack"  # the connecting side: waits for the listener's one-byte ack
    HELD = "held"  # authenticated; frames wait (bounded by MAX_HELD) for the channel to open
    OPEN = "open"  # frames go to the channel's events


class FrameStream(asyncio.Protocol):
    """The protocol under one direct link, from accept (or connect) to close."""

    def __init__(self, mode: Mode) -> None:
        loop = asyncio.get_running_loop()
        self.mode = mode
        self.transport: Any = None  # asyncio.Transport; the TLS one once wrapped
        self._buffer = bytearray()
        # The token (listener side) or b"" for the ack (connecting side); None: the
        # connection failed or closed first.
        self.handshake: asyncio.Future[bytes | None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.on_problem: Callable[[Reason], None] = lambda reason: None
        self.on_frame: Callable[[bytes | str], None] = lambda data: None
        self.on_writable: Callable[[], None] = lambda: None
        self.on_lost: Callable[[], None] = lambda: None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # TLS is up: the handshake came first

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close our side too: a half-closed link is a dead one

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost()

    # -- ours ------------------------------------------------------------------------------

    def open(self) -> None:
        """Deliver frames from now on, beginning with those that arrived while held."""
        self.mode = Mode.OPEN
        self._process()

    def fail(self, reason: Reason) -> None:
        log.info("direct stream dropped in mode %s: %s", self.mode.value, reason)
        self.on_problem(reason)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def write_frame(self, data: bytes | memoryview, text: bool = False) -> None:
        size = len(data)
        if size > MAX_FRAME:
            raise ProtocolError(Reason.FRAME_TOO_LARGE, f"{size} bytes > {MAX_FRAME}")
        header = _HEADER.pack(size | (_TEXT if text else 0))
        if size <= _SMALL:
            self.transport.write(header + bytes(data))
        else:
            self.transport.write(header)
            self.transport.write(data)

    def _process(self) -> None:
        buffer = self._buffer
        if self.mode is Mode.TOKEN:
            if len(buffer) < _HEADER.size:
                return
            (size,) = _HEADER.unpack_from(buffer)
            if size > MAX_TOKEN_FRAME:
                self.fail(Reason.FRAME_TOO_LARGE)
                return
            if len(buffer) < _HEADER.size + size:
                return
            token = bytes(buffer[_HEADER.size : _HEADER.size + size])
            del buffer[: _HEADER.size + size]
            self.mode = Mode.HELD
            self.handshake.set_result(token)
        elif self.mode is Mode.ACK:
            if not buffer:
                return
            if buffer[:1] != ACK:
                self.fail(Reason.MALFORMED)
                return
            del buffer[:1]
            self.mode = Mode.HELD
            self.handshake.set_result(b"")
        if self.mode is Mode.HELD:
            if len(buffer) > MAX_HELD:
                self.fail(Reason.FRAME_TOO_LARGE)
            return
        # Frames are copied once, out of a view of the buffer (a bytearray slice would be
        # a second copy), and the delivered prefix is dropped in one go: these loops move
        # every byte a direct link receives.
        frames: list[bytes | str] = []
        at = 0
        with memoryview(buffer) as view:
            while len(view) - at >= _HEADER.size:
                (word,) = _HEADER.unpack_from(view, at)
                size = word & ~_TEXT
                if size > MAX_FRAME:
                    self.fail(Reason.FRAME_TOO_LARGE)
                    return
                end = at + _HEADER.size + size
                if len(view) < end:
                    break
                payload = bytes(view[at + _HEADER.size : end])
                frames.append(payload.decode("utf-8", "replace") if word & _TEXT else payload)
                at = end
        del buffer[:at]
        for frame in frames:
            self.on_frame(frame)


class StreamChannel(DataChannel):
    """The mesh's data channel on an authenticated :class:`FrameStream`."""

    def __init__(self, stream: FrameStream, label: str) -> None:
        self.events = ChannelEvents()
        self.stream = stream
        self._label = label
        self._open = False
        self._closed = False
        # Fired once after the channel closed from the other side (EOF, reset, refusal).
        self.on_dropped: Callable[[], None] = lambda: None
        stream.on_frame = self._frame
        stream.on_writable = self._writable
        stream.on_lost = self._lost

    @property
    def label(self) -> str:
        return self._label

    @property
    def is_open(self) -> bool:
        return self._open and not self._closed

    @property
    def buffered_amount(self) -> int:
        transport = self.stream.transport
        return 0 if transport is None else int(transport.get_write_buffer_size())

    def set_buffered_amount_low_threshold(self, threshold: int) -> None:
        # Pausing at the threshold too means every drain below it is reported.
        self.stream.transport.set_write_buffer_limits(high=threshold, low=threshold)

    def send(self, data: bytes | str) -> None:
        if not self.is_open:
            raise PeerUnavailable("the direct stream is closed")
        if isinstance(data, str):
            self.stream.write_frame(data.encode(), text=True)
        else:
            self.stream.write_frame(data)

    def open(self) -> None:
        """Start delivering: ``on_open`` first, then whatever arrived meanwhile."""
        if self._open or self._closed:
            return
        self._open = True
        self.events.on_open()
        if not self._closed:
            self.stream.open()

    def close(self) -> None:
        """Close without callbacks (the backend's close)."""
        self._closed = True
        self.stream.abort()

    def _frame(self, data: bytes | str) -> None:
        if not self._closed:
            self.events.on_message(data)

    def _writable(self) -> None:
        if not self._closed:
            self.events.on_buffered_low()

    def _lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.events.on_close()
        self.on_dropped()
