"""Wider UDP socket buffers for a link's ICE sockets.

aiortc's SCTP runs in Python, so a receiving peer busy for a moment (decoding a frame,
a garbage collection) falls behind the sender's burst. At Linux's default receive buffer
(208 KiB, about 90 datagrams of 1.2 KB once kernel overhead is counted) the kernel then
drops datagrams, and every loss costs SCTP a fast retransmit and a halved congestion
window, or, at the tail of a message, a retransmission timeout of 1-3 s: measured on
loopback, 1.7 % of datagrams dropped turned a 5 MB push into 1-3.5 s. A buffer that holds
the peer's whole receive window (1 MiB in flight) absorbs such bursts.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

# Twice aiortc's advertised receive window: the kernel counts about 2x each datagram's
# payload against the buffer.
UDP_BUFFER_BYTES = 4 << 20


def widen(sock: Any, size: int = UDP_BUFFER_BYTES) -> int:
    """Ask for ``size`` bytes of receive and send buffer; the receive size obtained.

    The kernel caps the request at ``net.core.rmem_max``; a process with CAP_NET_ADMIN
    may go past the cap (``SO_RCVBUFFORCE``), anyone else keeps what the cap allows.
    """
    for plain, forced in (
        (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
        (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None)),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
            if forced is not None and sock.getsockopt(socket.SOL_SOCKET, plain) < size:
                sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            pass  # no permission to force, or not a socket that takes it: keep the default
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError:
        return 0


def widen_ice_sockets(pc: Any, size: int = UDP_BUFFER_BYTES) -> list[int]:
    """Widen the UDP sockets an aiortc ``RTCPeerConnection`` gathered; sizes obtained.

    The sockets live on aioice's ``Connection`` (``sctp -> dtls -> ice`` transports), one
    per gathered host or server-reflexive candidate; a TURN allocation's socket too.
    """
    try:
        protocols = list(pc.sctp.transport.transport._connection._protocols)
    except AttributeError:
        return []
    sizes = []
    for protocol in protocols:
        transport = getattr(protocol, "transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is not None and sock.type == socket.SOCK_DGRAM:
            sizes.append(widen(sock, size))
    return sizes
