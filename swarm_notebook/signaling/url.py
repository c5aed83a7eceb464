"""The signaling URL a person types, made usable, and a quick check that a server listens.

People type ``ws://host:8765`` (the server's path is ``/ws``): that gets ``/ws`` appended
instead of failing after ten seconds with a 404. ``check_listening`` says at once when
nothing listens at the address, with the ways to start a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from urllib.parse import urlsplit, urlunsplit

from swarm_notebook.errors import SignalingRefused, SignalingUnavailable, SignalingURLError
from swarm_notebook.reasons import Reason

WS_PATH = "/ws"  # where swarm-notebook signal serves the WebSocket
DEFAULT_PORTS = {"ws": 80, "wss": 443}
PROBE_TIMEOUT_S = 3.0
HOW_TO_GET_A_SERVER = (
    "start one: `%swarm local 2` or `swarm_notebook.local(workers=2)` (a signaling server and "
    "2 workers from this kernel), or `swarm-notebook up` / `swarm-notebook signal` in a "
    "terminal; or give the URL of a running one with --signaling / signaling="
)


def normalize_url(url: str) -> str:
    """``url`` with ``/ws`` added when it has no path; a clear error when it cannot work.

    >>> normalize_url("ws://127.0.0.1:8765")
    'ws://127.0.0.1:8765/ws'
    >>> normalize_url("wss://swarm.example.org/custom/ws")
    'wss://swarm.example.org/custom/ws'
    >>> normalize_url("http://127.0.0.1:8765/ws")
    Traceback (most recent call last):
    ...
    swarm_notebook.errors.SignalingURLError: bad-signaling-url: ...
    """
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in DEFAULT_PORTS:
        hint = f"ws://{parts.netloc}{parts.path or WS_PATH}" if parts.netloc else ""
        raise SignalingURLError(
            Reason.BAD_SIGNALING_URL,
            f"the signaling URL {url!r} must start with ws:// or wss://"
            + (f" (did you mean {hint}?)" if hint else ", e.g. ws://127.0.0.1:8765/ws"),
        )
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise SignalingURLError(
            Reason.BAD_SIGNALING_URL, f"the signaling URL {url!r} has a bad port"
        ) from None
    if not parts.hostname:
        raise SignalingURLError(
            Reason.BAD_SIGNALING_URL, f"the signaling URL {url!r} names no host"
        )
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, WS_PATH, parts.query, parts.fragment))
    return text


async def check_listening(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``SignalingUnavailable`` at once if nothing accepts connections at ``url``.

    Only a refused connection or an unknown host counts: a slow or filtered network is left
    to the signaling client's own retries and timeout.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 80)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return
    except OSError as exc:
        refused = isinstance(exc, ConnectionRefusedError) or exc.errno in (
            errno.ECONNREFUSED,
            errno.EADDRNOTAVAIL,
        )
        unknown_host = isinstance(exc, socket.gaierror)
        if not (refused or unknown_host):
            return
        what = "no signaling server listens at" if refused else "cannot resolve the host of"
        raise SignalingUnavailable(
            Reason.SIGNALING_UNREACHABLE,
            f"{what} {url} ({exc.strerror or exc}); " + HOW_TO_GET_A_SERVER,
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def not_a_signaling_server(url: str, status: int) -> SignalingRefused:
    """The error for an HTTP server at ``url`` that does not serve signaling there."""
    parts = urlsplit(url)
    hint = urlunsplit((parts.scheme, parts.netloc, WS_PATH, "", ""))
    return SignalingRefused(
        Reason.BAD_SIGNALING_URL,
        f"{url} answered HTTP {status}: no signaling endpoint at that path"
        + (f"; swarm-notebook signal serves {hint}" if parts.path != WS_PATH else ""),
    )
