"""One client socket on the server: its bound identity and its bounded outgoing queue.

Frames to a socket are queued and written by that socket's own writer task, so a slow
or stalled client only ever blocks itself; a queue that overflows marks it a slow
consumer and it is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from swarm_notebook._util.ratelimit import TokenBucket
from swarm_notebook.protocol.signaling import encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _CloseRequest:
    code: int
    message: bytes


class Connection:
    """A socket's state: nonce, remote address, room and peer id once joined, rate buckets,
    outgoing queue."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        abort_transport: Callable[[], None],
        *,
        nonce: str,
        address: str,
        send_queue_limit: int,
        rate: TokenBucket,
        rate_strikes: TokenBucket,
        protocol_strikes: TokenBucket,
    ) -> None:
        self.ws = ws
        self.nonce = nonce
        # The remote address as a quota key (see signaling/quotas.address_key).
        self.address = address
        self.rate = rate
        self.rate_strikes = rate_strikes
        self.protocol_strikes = protocol_strikes
        self.room: str | None = None
        self.peer_id: str | None = None
        self._abort_transport = abort_transport
        self._limit = send_queue_limit
        # Bounded by ``send``'s check; only the final frame and the close request may
        # exceed the limit, by at most two items.
        self._queue: asyncio.Queue[str | _CloseRequest] = asyncio.Queue()
        # Below this backlog the socket's own reader may go on reading (see wait_for_room).
        self._room_mark = max(1, send_queue_limit // 2)
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._closing = False

    @property
    def joined(self) -> bool:
        return self.peer_id is not None

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, message: msgspec.Struct) -> bool:
        """Queue a frame; False when the socket is closing or its queue is full."""
        if self._closing or self._queue.qsize() >= self._limit:
            return False
        self._queue.put_nowait(encode(message))
        if self._queue.qsize() >= self._room_mark:
            self._has_room.clear()
        return True

    async def wait_for_room(self, timeout: float) -> bool:
        """Wait until the backlog is below half the limit; False if it stays full.

        The reader calls this after each frame, so a client that floods us without
        reading our replies is slowed down by TCP instead of overflowing its queue.
        """
        if self._has_room.is_set() or self._closing:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._has_room.wait()
        except TimeoutError:
            return False
        return True

    def close_with(self, message: msgspec.Struct | None, *, code: int, why: str = "") -> None:
        """Send ``message`` (if any) after everything already queued, then close."""
        if self._closing:
            return
        self._closing = True
        if message is not None:
            self._queue.put_nowait(encode(message))
        self._queue.put_nowait(_CloseRequest(code, why.encode("utf-8")[:120]))

    def abort(self) -> None:
        """Drop the TCP connection at once (for a client that stopped reading)."""
        self._closing = True
        self._abort_transport()

    async def write_loop(self) -> None:
        """Write queued frames until a close request; owned by the socket's handler."""
        try:
            while True:
                item = await self._queue.get()
                if self._queue.qsize() < self._room_mark:
                    self._has_room.set()
                if isinstance(item, _CloseRequest):
                    await self.ws.close(code=item.code, message=item.message)
                    return
                await self.ws.send_str(item)
        except (ConnectionError, RuntimeError) as exc:
            # The peer went away under us; the reader sees the close and cleans up.
            log.debug("signaling write to %s stopped: %s", self.peer_id, exc)
            self.abort()
