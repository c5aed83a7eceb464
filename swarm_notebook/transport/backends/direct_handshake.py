"""Both ends of the direct path's handshake: the offerer's listener and the answerer's dial.

The answerer connects by TLS, checks that the server's certificate is the one the offer's
``a=fingerprint`` names, sends the offer's token as its first frame and waits for a
one-byte ack. The listener admits exactly one connection (the first with the right
token) and closes as soon as it has one. Before a connection proves the token it can
cost us little: at most ``MAX_PENDING`` of them at once, a handshake deadline, and a
token frame of at most 64 bytes; any other byte is garbage and drops it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Callable

from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import TransportError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends import direct_tls
from swarm_notebook.transport.backends.direct_channel import ACK, FrameStream, Mode
from swarm_notebook.transport.backends.direct_sdp import DirectOffer

log = logging.getLogger(__name__)

MAX_PENDING = 8  # connections accepted that have not proved the token yet


class Listener:
    """The offerer's TLS listener for one link."""

    def __init__(
        self,
        context: ssl.SSLContext,
        token: str,
        timeout_s: float,
        count: Callable[[Reason], None],
    ) -> None:
        self._context = context
        self._token = token.encode()
        self._timeout_s = timeout_s
        self._count = count
        self._server: asyncio.Server | None = None
        self._pending: set[FrameStream] = set()
        self._tasks = OwnedTasks("direct-listener")
        self.accepted: FrameStream | None = None
        self.accepted_event = asyncio.Event()

    async def start(self, host: str) -> int:
        """Listen on ``host``; returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_stream, host, 0, backlog=MAX_PENDING, start_serving=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def _new_stream(self) -> FrameStream:
        stream = FrameStream(Mode.PLAIN)
        stream.on_arrived = self._arrived
        return stream

    def _arrived(self, stream: FrameStream) -> None:
        if not self.listening or self.accepted is not None:
            stream.abort()
            return
        if len(self._pending) >= MAX_PENDING:
            self._count(Reason.TOO_MANY_PENDING)
            stream.abort()
            return
        self._pending.add(stream)
        stream.on_problem = self._count
        self._tasks.spawn(self._handshake(stream), name="direct-accept")

    async def _handshake(self, stream: FrameStream) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                stream.expect_token()
                tls = await loop.start_tls(
                    stream.transport, stream, self._context, server_side=True
                )
                if tls is None:
                    raise ConnectionResetError("closed during the TLS handshake")
                stream.use_tls(tls)
                token = await stream.handshake
        except TimeoutError:
            self._count(Reason.DIRECT_TIMEOUT)
            stream.abort()
            return
        except (OSError, ssl.SSLError) as exc:  # garbage instead of a TLS hello, a reset
            self._count(Reason.TLS_FAILED)
            log.debug("direct listener: handshake failed: %s", exc)
            stream.abort()
            return
        finally:
            self._pending.discard(stream)
        if token is None:
            return  # closed, or refused with its own counted reason (a frame too large)
        if self.accepted is not None or not hmac.compare_digest(token, self._token):
            self._count(Reason.BAD_TOKEN)
            stream.abort()
            return
        self.accepted = stream
        stream.transport.write(ACK)
        self.stop_listening()
        self.accepted_event.set()

    def stop_listening(self) -> None:
        """No more connections; those still proving themselves are dropped."""
        if self._server is not None:
            self._server.close()
        for stream in list(self._pending):
            stream.abort()

    def take(self) -> FrameStream | None:
        """The accepted stream, handed over to its channel (the listener forgets it)."""
        stream, self.accepted = self.accepted, None
        return stream

    async def close(self) -> None:
        self.stop_listening()
        await self._tasks.close()
        stream = self.take()
        if stream is not None:
            stream.abort()
            await asyncio.wait_for(asyncio.shield(stream.lost), 1.0)


async def connect(offer: DirectOffer, expected_fingerprint: str, timeout_s: float) -> FrameStream:
    """The answerer's TLS stream to ``offer``, acknowledged; a ``TransportError`` naming
    why not (the caller falls back to WebRTC)."""
    loop = asyncio.get_running_loop()
    stream: FrameStream | None = None
    try:
        async with asyncio.timeout(timeout_s):
            _, stream = await loop.create_connection(
                lambda: FrameStream(Mode.ACK),
                offer.host,
                offer.port,
                ssl=direct_tls.client_context(),
                server_hostname="",
            )
            seen = direct_tls.peer_fingerprint(stream.transport.get_extra_info("ssl_object"))
            if seen != expected_fingerprint.upper():
                raise TransportError(
                    Reason.FINGERPRINT_MISMATCH,
                    f"the direct listener's certificate {seen} is not the offer's",
                )
            stream.write_frame(offer.token.encode())
            if await stream.handshake is None:
                raise TransportError(Reason.DIRECT_REFUSED, "the listener closed the stream")
            return stream
    except TransportError:
        _abort(stream)
        raise
    except TimeoutError:
        _abort(stream)
        raise TransportError(
            Reason.DIRECT_TIMEOUT, f"no direct stream in {timeout_s:g} s"
        ) from None
    except ssl.SSLError as exc:
        _abort(stream)
        raise TransportError(Reason.TLS_FAILED, str(exc)) from None
    except OSError as exc:
        _abort(stream)
        raise TransportError(Reason.DIRECT_UNREACHABLE, str(exc)) from None
    except BaseException:
        _abort(stream)
        raise


def _abort(stream: FrameStream | None) -> None:
    if stream is not None:
        stream.abort()
