"""Signaling client: joins a room, relays WebRTC signals, and keeps itself connected.

Example (in a notebook cell)::

    from swarm_notebook.identity import Identity
    from swarm_notebook.signaling import SignalingClient

    client = SignalingClient(
        "ws://127.0.0.1:8765/ws", "lab", Identity.load_or_create(),
        on_signal=lambda peer, data: print(peer[:8], data),
    )
    await client.start()
    print(client.members)
    await client.send_signal(next(iter(client.members)), {"kind": "offer", "sdp": "..."})
    await client.close()

Callbacks may be plain functions or coroutines; they run one at a time, in the order the
server sent the events, and an exception in one is logged and never stops the client.
On the first join ``on_peer_joined`` fires for every peer already in the room. After a
re-join, peers that are still there produce no events; peers that are missing get
``on_peer_left`` only if they stay missing for ``departure_grace`` seconds.

Callbacks run on the task that also marks the client connected, so a callback must not
await ``wait_connected`` (it would wait for itself); ``send_signal`` is fine.

TLS: a ``wss://`` server's certificate is always verified, against the system's trusted
authorities (or the bundle in ``SSL_CERT_FILE``). To trust a self-signed certificate, or
one from a private authority, pass ``ca_file="server.pem"`` or set
``SWARM_NOTEBOOK_CA_FILE=server.pem`` (also read by ``join()`` and ``swarm-notebook
worker``). A certificate that cannot be verified ends ``start()`` with a
``SignalingTLSError`` that says why and how to fix it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

import swarm_notebook.environment as environment
from swarm_notebook.errors import (
    SignalingError,
    SignalingRefused,
    SignalingTimeout,
    SignalingTLSError,
    SignalingUnavailable,
)
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    IceServers,
    Join,
    Joined,
    PeerJoined,
    PeerLeft,
    RefreshIce,
    Shutdown,
    Signal,
    decode_server_message,
    encode,
    join_payload,
    secret_proof,
)
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling.membership import MembershipChanges, RoomMembership
from swarm_notebook.signaling.turn_credentials import RENEW_AT_FRACTION
from swarm_notebook.signaling.url import normalize_url, not_a_signaling_server

log = logging.getLogger(__name__)

# Refusals a client must not retry: retrying cannot change the answer. ``replaced`` is
# not one: it means another process proved our key (a stolen key, or a second copy of this
# profile); going silent would hand our identity to it for good, so we keep retrying with
# a growing backoff and say so loudly.
FINAL_REFUSALS = frozenset(
    {Reason.BAD_SIGNATURE, Reason.BAD_SECRET, Reason.BAD_ROOM, Reason.BAD_ID}
)
REPLACED_BACKOFF_MAX = 30.0

Callback = Callable[..., Any]

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})

DEFAULT_MAX_FRAME_BYTES = 64 * 1024
PROTOCOL_ERROR = "protocol"
DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class _JoinedEvent:
    session: int
    peers: tuple[str, ...]


@dataclass(frozen=True)
class _PeerJoinedEvent:
    peer_id: str


@dataclass(frozen=True)
class _PeerLeftEvent:
    peer_id: str


@dataclass(frozen=True)
class _SignalEvent:
    from_peer: str
    data: dict[str, Any]


@dataclass(frozen=True)
class _IceServersEvent:
    servers: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class _ErrorEvent:
    reason: str
    message: str
    peer: str | None = None


@dataclass(frozen=True)
class _DisconnectedEvent:
    reason: str


_Event = (
    _JoinedEvent
    | _PeerJoinedEvent
    | _PeerLeftEvent
    | _SignalEvent
    | _IceServersEvent
    | _ErrorEvent
    | _DisconnectedEvent
)


class SignalingClient:
    """One identity in one room of a signaling server, reconnecting on its own.

    ``on_signal(from_peer_id, data)``, ``on_peer_joined(peer_id)``,
    ``on_peer_left(peer_id)``, ``on_error(reason, message)`` (a server ``Error`` that
    did not end the connection, e.g. ``unknown-peer``), ``on_undeliverable(peer_id)`` (a
    signal could not reach that peer: it is not in the room) and ``on_disconnected(reason)``
    (``"shutdown"``, ``"closed"``, ``"lost"`` or a refusal reason).
    ``on_ice_servers(servers)`` gets the ICE servers the server issues (at join and at each
    renewal, which the client asks for before the TURN credentials expire).
    """

    def __init__(
        self,
        url: str,
        room: str,
        identity: Identity,
        secret: str | None = None,
        *,
        on_signal: Callback | None = None,
        on_peer_joined: Callback | None = None,
        on_peer_left: Callback | None = None,
        on_error: Callback | None = None,
        on_disconnected: Callback | None = None,
        on_undeliverable: Callback | None = None,
        on_ice_servers: Callback | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        departure_grace: float = 5.0,
        join_timeout: float = 10.0,
        heartbeat: float | None = 20.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        event_queue_size: int = 1024,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        ca_file: str | None = None,
    ) -> None:
        self.url = normalize_url(url)  # ws://host:port gets the server's /ws path
        self._ca_file = ca_file or os.environ.get(environment.CA_FILE) or None
        self.room = room
        self._identity = identity
        self._secret = secret
        self._on_signal = on_signal
        self._on_peer_joined = on_peer_joined
        self._on_peer_left = on_peer_left
        self._on_error = on_error
        self._on_disconnected = on_disconnected
        self._on_undeliverable = on_undeliverable
        self._on_ice_servers = on_ice_servers
        self.ice_servers: list[dict[str, Any]] = []
        self.ice_expires: float | None = None
        self._wall_clock = wall_clock  # TURN expiries are Unix times
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._join_timeout = join_timeout
        self._heartbeat = heartbeat
        self._max_frame_bytes = max_frame_bytes
        self._rng = rng or random.Random()
        self._membership = RoomMembership(grace=departure_grace)
        self._events: asyncio.Queue[_Event] = asyncio.Queue(maxsize=event_queue_size)
        self._http: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self._session = 0
        self._live_session: int | None = None
        self._connected = False
        self._connected_event = asyncio.Event()
        self._first_joined = asyncio.Event()
        self._closed = False
        self._replaced_streak = 0
        self.replaced_backoff_max = REPLACED_BACKOFF_MAX
        # Why the client stopped for good: a final refusal, or a TLS failure before joining.
        self.refusal: SignalingError | None = None
        self.last_error: str | None = None
        self._counters: Counter[str] = Counter()
        self._errors_received: Counter[str] = Counter()

    # -- public API --------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._identity.peer_id

    @property
    def members(self) -> frozenset[str]:
        """Other peers in the room as last known (kept as they were during an outage)."""
        return self._membership.members

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self, timeout: float | None = None) -> None:
        """Connect and return once joined; raises ``SignalingRefused`` / ``SignalingTimeout``.

        Until it succeeds, connection failures are retried with backoff for up to
        ``timeout`` seconds (default: ``join_timeout``).
        """
        if self._run_task is not None:
            raise RuntimeError("signaling client already started")
        self._ssl = tls_context(self.url, self._ca_file)
        self._http = aiohttp.ClientSession()
        self._dispatch_task = asyncio.create_task(self._dispatch(), name="signaling-dispatch")
        self._run_task = asyncio.create_task(self._run(), name="signaling-connection")
        try:
            await self._wait_for(self._first_joined, timeout or self._join_timeout, "join")
        except BaseException:
            await self.close()
            raise

    async def wait_connected(self, timeout: float) -> None:
        """Wait until (re-)joined; raises ``SignalingTimeout`` or the final refusal."""
        await self._wait_for(self._connected_event, timeout, "reconnect")

    async def send_signal(self, to_peer_id: str, data: dict[str, Any]) -> None:
        """Relay ``data`` to one peer in the room (the server stamps our id as ``from``).

        Raises ``SignalingUnavailable`` while disconnected and ``SignalingError``
        (reason ``too-large``) for a frame over ``max_frame_bytes``.
        """
        ws = self._ws
        if not self._connected or ws is None or ws.closed:
            raise SignalingUnavailable(DISCONNECTED, "not connected to the signaling server")
        frame = encode(Signal(data=data, to=to_peer_id))
        size = len(frame.encode("utf-8"))
        if size > self._max_frame_bytes:
            raise SignalingError(
                Reason.TOO_LARGE,
                f"signal of {size} bytes exceeds the {self._max_frame_bytes} byte limit",
            )
        try:
            async with self._send_lock:
                await ws.send_str(frame)
        except (ConnectionError, RuntimeError) as exc:
            raise SignalingUnavailable(
                DISCONNECTED, f"connection lost while sending: {exc}"
            ) from exc
        self._counters["signals_sent"] += 1

    async def close(self) -> None:
        """Leave the room and stop reconnecting; waits for the background tasks."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._run_task, self._dispatch_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("signaling task ended with an error", exc_info=task.exception())
        if self._http is not None:
            await self._http.close()
        self._connected = False
        self._connected_event.clear()

    @property
    def identity_conflicts(self) -> int:
        """How often another connection proved our key and took our place in the room."""
        return self._counters["replaced"]

    def stats(self) -> dict[str, Any]:
        """Counters: joins, reconnect attempts, signals sent/received, errors by reason."""
        return {
            "identity_conflicts": self._counters["replaced"],
            "connected": self._connected,
            "members": len(self._membership.members),
            "joins": self._counters["joins"],
            "reconnects": max(0, self._counters["joins"] - 1),
            "connect_attempts": self._counters["connect_attempts"],
            "disconnects": self._counters["disconnects"],
            "shutdowns_received": self._counters["shutdowns_received"],
            "signals_sent": self._counters["signals_sent"],
            "signals_received": self._counters["signals_received"],
            "bad_frames": self._counters["bad_frames"],
            "callback_errors": self._counters["callback_errors"],
            "errors_received": dict(self._errors_received),
            "ice_issued": self._counters["ice_issued"],
            "ice_renewals_asked": self._counters["ice_renewals_asked"],
        }

    # -- connection --------------------------------------------------------------------

    async def _wait_for(self, event: asyncio.Event, timeout: float, what: str) -> None:
        if self._run_task is None:
            raise RuntimeError("signaling client not started")
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait(
                {waiter, self._run_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            await asyncio.wait({waiter})
        if event.is_set():
            return
        if self.refusal is not None:
            raise self.refusal
        if self._run_task.done():
            raise SignalingUnavailable(DISCONNECTED, "signaling client is closed")
        raise SignalingTimeout(
            Reason.TIMEOUT,
            f"could not {what} room {self.room!r} at {self.url} within {timeout:g} s"
            f" (last error: {self.last_error or 'none'})",
        )

    async def _run(self) -> None:
        attempt = 0
        while True:
            joined = False
            try:
                joined = await self._connect_once()
            except SignalingRefused as exc:
                self.refusal = exc
                self.last_error = str(exc)
                log.error("signaling server refused %s: %s", self._identity.short_id(), exc)
                await self._events.put(_DisconnectedEvent(exc.reason))
                return
            except aiohttp.ClientSSLError as exc:
                error = self._tls_error(exc)
                self.last_error = str(error)
                if self._counters["joins"] == 0:
                    # Never got in: retrying cannot fix trust, so say it at once.
                    self.refusal = error
                    log.error("signaling %s", error.message)
                    await self._events.put(_DisconnectedEvent(error.reason))
                    return
                # Joined before: the server may be mid-renewal; keep trying, loudly.
                log.error("signaling %s (retrying)", error.message)
            except aiohttp.WSServerHandshakeError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self._counters["joins"] == 0 and exc.status in (404, 405):
                    # Something answers HTTP there, but it is not a signaling endpoint:
                    # waiting cannot fix the URL, so say what to type instead.
                    self.refusal = not_a_signaling_server(self.url, exc.status)
                    log.error("signaling %s", self.refusal.message)
                    await self._events.put(_DisconnectedEvent(self.refusal.reason))
                    return
                log.info("signaling connection to %s failed: %s", self.url, self.last_error)
            except (aiohttp.ClientError, OSError, TimeoutError, SignalingError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("signaling connection to %s failed: %s", self.url, self.last_error)
            except Exception as exc:  # a bug here must not end reconnection
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("signaling connection to %s crashed", self.url)
            attempt = 0 if joined else attempt + 1
            if self._replaced_streak:
                # Two holders of one key would evict each other in a tight loop: back off
                # harder each time, but never give the room to the other one for good.
                delay = min(
                    self.replaced_backoff_max,
                    self._backoff_initial * (2.0 ** min(self._replaced_streak + 2, 30)),
                )
                await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))
                continue
            await asyncio.sleep(self._backoff_delay(attempt))

    def _tls_error(self, exc: aiohttp.ClientSSLError) -> SignalingTLSError:
        if not isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return SignalingTLSError(
                Reason.TLS_FAILED,
                f"TLS handshake with {self.url} failed ({exc}); check that the server serves"
                " wss:// on that port (swarm-notebook signal --certfile/--keyfile)",
            )
        detail = exc.certificate_error
        why = str(getattr(detail, "verify_message", None) or detail).rstrip(".")
        if getattr(detail, "verify_code", None) in _NAME_MISMATCH:
            return SignalingTLSError(
                Reason.UNTRUSTED_CERTIFICATE,
                f"the TLS certificate of {self.url} is not issued for the host in that URL"
                f" ({why}): connect by a name the certificate lists, or reissue it with this"
                f" name as a subject alternative name ({environment.CA_FILE} trusts a certificate,"
                " it cannot change the names it is valid for)",
            )
        trust = (
            f"the CA file {self._ca_file!r} does not vouch for it"
            if self._ca_file
            else "it is not signed by an authority this machine trusts"
        )
        return SignalingTLSError(
            Reason.UNTRUSTED_CERTIFICATE,
            f"cannot verify the TLS certificate of {self.url} ({why}): {trust}. If the server"
            f" uses a self-signed certificate, trust it with {environment.CA_FILE}="
            "/path/to/cert.pem (or ca_file=... / --ca-file)",
        )

    def _backoff_delay(self, attempt: int) -> float:
        base = min(self._backoff_max, self._backoff_initial * (2.0 ** min(attempt, 30)))
        return base * (0.5 + 0.5 * self._rng.random())

    async def _connect_once(self) -> bool:
        """One connection: handshake, then read until it ends. True if it joined."""
        assert self._http is not None
        self._counters["connect_attempts"] += 1
        async with asyncio.timeout(self._join_timeout):
            ws = await self._http.ws_connect(
                self.url,
                ssl=self._ssl if self._ssl is not None else True,
                heartbeat=self._heartbeat,
                max_msg_size=self._max_frame_bytes * 4,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
        try:
            async with asyncio.timeout(self._join_timeout):
                peers = await self._handshake(ws)
            self._session += 1
            self._live_session = self._session
            self._ws = ws
            self._counters["joins"] += 1
            await self._events.put(_JoinedEvent(self._session, tuple(peers)))
            renewer = asyncio.create_task(self._renew_ice(ws), name="signaling-ice-renewal")
            try:
                reason = await self._read_until_closed(ws)
            except (aiohttp.ClientError, OSError) as exc:
                reason = "lost"
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                self._ws = None
                self._live_session = None
                self._connected = False
                self._connected_event.clear()
                self._counters["disconnects"] += 1
            if reason != Reason.REPLACED:
                self._replaced_streak = 0
            log.info("signaling connection to %s ended: %s", self.url, reason)
            await self._events.put(_DisconnectedEvent(reason))
            return True
        finally:
            await ws.close()

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse) -> list[str]:
        challenge = await self._receive(ws)
        self._raise_for_refusal(challenge)
        if not isinstance(challenge, Challenge):
            raise SignalingError(PROTOCOL_ERROR, f"expected a challenge, got {challenge!r:.80}")
        nonce, peer_id = challenge.nonce, self._identity.peer_id
        signature = self._identity.sign(join_payload(nonce, self.room, peer_id)).hex()
        proof = secret_proof(self._secret, nonce, peer_id) if self._secret is not None else None
        join = Join(room=self.room, peer_id=peer_id, signature=signature, secret_proof=proof)
        await ws.send_str(encode(join))
        reply = await self._receive(ws)
        self._raise_for_refusal(reply)
        if not isinstance(reply, Joined) or reply.peer_id != peer_id or reply.room != self.room:
            raise SignalingError(PROTOCOL_ERROR, f"expected joined, got {reply!r:.80}")
        if reply.ice_servers is not None:
            await self._issued(reply.ice_servers, reply.ice_expires)
        return [p for p in reply.peers if p != peer_id]

    async def _issued(self, servers: list[dict[str, Any]], expires: float | None) -> None:
        self.ice_servers, self.ice_expires = list(servers), expires
        self._counters["ice_issued"] += 1
        await self._events.put(_IceServersEvent(tuple(servers)))

    async def _renew_ice(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Ask for fresh TURN credentials once most of the issued ones' life is gone."""
        while True:
            expires = self.ice_expires
            if expires is None:
                return
            issued_for = max(1.0, expires - self._wall_clock())
            await asyncio.sleep(issued_for * RENEW_AT_FRACTION)
            if self.ice_expires != expires:
                continue  # renewed meanwhile (e.g. the server pushed new ones)
            try:
                async with self._send_lock:
                    await ws.send_str(encode(RefreshIce()))
            except (ConnectionError, RuntimeError):
                return
            self._counters["ice_renewals_asked"] += 1
            # Ask again only after an answer moved the expiry, or the next period.
            await asyncio.sleep(max(1.0, issued_for * (1 - RENEW_AT_FRACTION) / 2))

    def _raise_for_refusal(self, message: msgspec.Struct) -> None:
        """During the handshake an Error or Shutdown ends this attempt."""
        if isinstance(message, Error):
            self._errors_received[message.reason] += 1
            if message.reason in FINAL_REFUSALS:
                raise SignalingRefused(message.reason, message.message)
            raise SignalingError(message.reason, message.message)
        if isinstance(message, Shutdown):
            self._counters["shutdowns_received"] += 1
            raise SignalingError(Reason.SHUTDOWN, message.message)

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse
    ) -> Challenge | Joined | PeerJoined | PeerLeft | Signal | Error | Shutdown | IceServers:
        msg = await ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            try:
                return decode_server_message(msg.data)
            except msgspec.DecodeError as exc:
                raise SignalingError(PROTOCOL_ERROR, f"bad frame from server: {exc}") from exc
        raise SignalingError(
            DISCONNECTED, f"server closed the connection during join (code {ws.close_code})"
        )

    async def _read_until_closed(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if msg.type is aiohttp.WSMsgType.ERROR:
                    self.last_error = f"websocket error: {msg.data}"
                    return "lost"
                self._bad_frame(f"unexpected {msg.type.name} frame")
                continue
            try:
                message = decode_server_message(msg.data)
            except msgspec.DecodeError as exc:
                self._bad_frame(str(exc))
                continue
            if isinstance(message, Signal):
                if not message.from_:
                    self._bad_frame("signal without 'from'")
                    continue
                self._counters["signals_received"] += 1
                await self._events.put(_SignalEvent(message.from_, message.data))
            elif isinstance(message, PeerJoined):
                await self._events.put(_PeerJoinedEvent(message.peer_id))
            elif isinstance(message, PeerLeft):
                await self._events.put(_PeerLeftEvent(message.peer_id))
            elif isinstance(message, IceServers):
                await self._issued(message.ice_servers, message.ice_expires)
            elif isinstance(message, Error):
                self._errors_received[message.reason] += 1
                if message.reason == Reason.REPLACED:
                    self._counters["replaced"] += 1
                    self._replaced_streak += 1
                    log.warning(
                        "IDENTITY CONFLICT: another process holds the key of peer %s and took "
                        "its place in room %r (%d time(s)); retrying. If this is not a second "
                        "copy of this profile, the key may be stolen: run "
                        "`swarm-notebook identity rotate`.",
                        self._identity.short_id(),
                        self.room,
                        self._counters["replaced"],
                    )
                    return Reason.REPLACED.value
                if message.reason in FINAL_REFUSALS:
                    raise SignalingRefused(message.reason, message.message)
                log.warning("signaling server error %s: %s", message.reason, message.message)
                await self._events.put(_ErrorEvent(message.reason, message.message, message.peer))
            elif isinstance(message, Shutdown):
                self._counters["shutdowns_received"] += 1
                return "shutdown"
            else:
                self._bad_frame(f"unexpected {type(message).__name__} after join")
        return "closed"

    def _bad_frame(self, detail: str) -> None:
        self._counters["bad_frames"] += 1
        log.warning("ignored a bad frame from the signaling server: %.200s", detail)

    # -- events ------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Apply events to the membership view and run callbacks, strictly in order."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._membership.next_deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    event = await self._events.get()
            except TimeoutError:
                await self._announce(self._membership.expire(loop.time()))
                continue
            await self._apply(event, loop.time())

    async def _apply(self, event: _Event, now: float) -> None:
        if isinstance(event, _JoinedEvent):
            if event.session != self._live_session:
                return  # that connection already dropped again
            changes = self._membership.rejoined(event.peers, now)
            self._connected = True
            self._connected_event.set()
            self._first_joined.set()
            await self._announce(changes)
        elif isinstance(event, _PeerJoinedEvent):
            await self._announce(self._membership.peer_joined(event.peer_id, now))
        elif isinstance(event, _PeerLeftEvent):
            await self._announce(self._membership.peer_left(event.peer_id, now))
        elif isinstance(event, _SignalEvent):
            await self._call("on_signal", self._on_signal, event.from_peer, event.data)
        elif isinstance(event, _IceServersEvent):
            await self._call("on_ice_servers", self._on_ice_servers, list(event.servers))
        elif isinstance(event, _ErrorEvent):
            await self._call("on_error", self._on_error, event.reason, event.message)
            if event.peer is not None and event.reason == Reason.UNKNOWN_PEER:
                await self._call("on_undeliverable", self._on_undeliverable, event.peer)
        else:
            await self._call("on_disconnected", self._on_disconnected, event.reason)

    async def _announce(self, changes: MembershipChanges) -> None:
        for peer in changes.left:
            await self._call("on_peer_left", self._on_peer_left, peer)
        for peer in changes.joined:
            await self._call("on_peer_joined", self._on_peer_joined, peer)

    async def _call(self, name: str, callback: Callback | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._counters["callback_errors"] += 1
            log.exception("signaling %s callback failed", name)


def tls_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The verifying TLS context for a ``wss://`` URL (None for ``ws://``).

    With ``ca_file`` only that bundle is trusted; without it the system's authorities
    (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` apply). Raises ``SignalingTLSError`` for a CA file
    that cannot be read.
    """
    if not url.lower().startswith("wss://"):
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SignalingTLSError(
            Reason.TLS_FAILED, f"cannot load the CA file {ca_file!r} ({environment.CA_FILE}): {exc}"
        ) from exc
