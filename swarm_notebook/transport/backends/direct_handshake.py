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
import socket
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
# The kernel completes a TCP handshake with a listening socket however busy the peer's
# Python is, so a reachable listener answers within one round trip; an unreachable one
# (another NAT's private address) costs only this much before WebRTC carries the link.
TCP_CONNECT_TIMEOUT_S = 0.3


class Listener:
    """The offerer's TLS listener for one link.

    It accepts by hand (``sock_accept``, then ``connect_accepted_socket``) rather than
    with ``create_server(ssl=...)``: so a connection over the pending cap is closed
    before any TLS work, and a failed handshake (a stranger's garbage) is an exception
    here that we can count, on asyncio's loop and on uvloop alike.
    """

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
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[socket.socket] = set()
        self._tasks = OwnedTasks("direct-listener")
        self.accepted: FrameStream | None = None
        self.accepted_event = asyncio.Event()

    async def start(self, host: str) -> int:
        """Listen on ``host``; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        try:
            listening.bind((host, 0))
            listening.listen(MAX_PENDING)
            listening.setblocking(False)
        except OSError:
            listening.close()
            raise
        self._socket = listening
        self._accepting = self._tasks.spawn(self._accept_loop(listening), name="direct-listen")
        return int(listening.getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._socket is not None

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listening)
            if self.accepted is not None or self._socket is None:
                conn.close()
            elif len(self._pending) >= MAX_PENDING:
                self._count(Reason.TOO_MANY_PENDING)
                conn.close()
            else:
                self._pending.add(conn)
                self._tasks.spawn(self._handshake(conn), name="direct-accept")

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        # Made here, not taken from the call's result: uvloop returns its SSL protocol
        # there instead of ours.
        stream = FrameStream(Mode.TOKEN)
        stream.on_problem = self._count
        try:
            async with asyncio.timeout(self._timeout_s):
                await loop.connect_accepted_socket(
                    lambda: stream,
                    conn,
                    ssl=self._context,
                    ssl_handshake_timeout=self._timeout_s,
                )
                token = await stream.handshake
        except TimeoutError:
            self._count(Reason.DIRECT_TIMEOUT)
            _drop(conn, stream)
            return
        except OSError as exc:  # ssl.SSLError too: garbage instead of a TLS hello, a reset
            self._count(Reason.TLS_FAILED)
            log.debug("direct listener: handshake failed: %s", exc)
            _drop(conn, stream)
            return
        except BaseException:
            _drop(conn, stream)
            raise
        finally:
            self._pending.discard(conn)
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
        """No more connections (those still proving themselves end with their tasks).

        The socket closes once the accept loop has ended: closing it under a pending
        ``sock_accept`` would leave the loop watching a dead descriptor.
        """
        listening, self._socket = self._socket, None
        accepting, self._accepting = self._accepting, None
        if listening is None:
            return
        if accepting is None or accepting.done():
            listening.close()
            return
        accepting.add_done_callback(lambda task: listening.close())
        accepting.cancel()

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
            await asyncio.wait([stream.lost], timeout=1.0)


def _drop(conn: socket.socket, stream: FrameStream) -> None:
    stream.abort()
    conn.close()  # idempotent; the transport may have closed it already


async def connect(offer: DirectOffer, expected_fingerprint: str, timeout_s: float) -> FrameStream:
    """The answerer's TLS stream to ``offer``, acknowledged; a ``TransportError`` naming
    why not (the caller falls back to WebRTC)."""
    loop = asyncio.get_running_loop()
    sock = await _tcp_connect(offer, min(timeout_s, TCP_CONNECT_TIMEOUT_S))
    stream = FrameStream(Mode.ACK)  # ours, not the call's result (uvloop's SSL protocol)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(
                lambda: stream,
                sock=sock,
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


async def _tcp_connect(offer: DirectOffer, timeout_s: float) -> socket.socket:
    """A connected TCP socket to the offer's listener, before any TLS."""
    family = socket.AF_INET6 if ":" in offer.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, (offer.host, offer.port))
    except TimeoutError:
        sock.close()
        raise TransportError(
            Reason.DIRECT_TIMEOUT,
            f"no TCP connection to {offer.host}:{offer.port} in {timeout_s:g} s",
        ) from None
    except OSError as exc:
        sock.close()
        raise TransportError(Reason.DIRECT_UNREACHABLE, str(exc)) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _abort(stream: FrameStream) -> None:
    stream.abort()
