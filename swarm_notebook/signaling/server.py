"""The signaling server: rooms of key-proven peers that relay WebRTC offers to each other.

Replacement policy: when a second socket proves the key of a peer id that is already
connected in the room, it takes the id over silently — the old socket gets
``Error(reason="replaced")`` and is closed, and the other members see neither
``PeerLeft`` nor ``PeerJoined`` (the peer never stopped being a member, so its peer
links stay up).

Per remote address (signaling/quotas.py) the server bounds open sockets, sockets that have
not joined yet, rooms created and peers per room, and locks out an address that keeps
guessing room secrets; each refusal is counted by reason and by address in ``/stats``.
With ``SignalingConfig(certfile=..., keyfile=...)`` it serves ``wss://``.

Example (in a notebook or test)::

    server = SignalingServer(SignalingConfig(port=0))
    port = await server.start()
    print(server.url)          # ws://127.0.0.1:<port>/ws
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from swarm_notebook._util.ratelimit import TokenBucket
from swarm_notebook.identity import is_canonical_peer_id, verify_signature
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
    decode_client_message,
    join_payload,
    secret_proof,
)
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling.config import SignalingConfig
from swarm_notebook.signaling.connection import Connection
from swarm_notebook.signaling.quotas import AddressQuotas, address_key
from swarm_notebook.signaling.rooms import RoomRegistry
from swarm_notebook.signaling.turn_credentials import TurnIssuer
from swarm_notebook.signaling.url import WS_PATH

log = logging.getLogger(__name__)

# Seconds a closing socket gets to flush its last frames before it is dropped.
FLUSH_TIMEOUT = 2.0
STRIKE_REFILL_PER_SECOND = 1.0
# How long a socket's reader waits for the client to take its replies before dropping it.
OWN_BACKLOG_TIMEOUT = 10.0


class SignalingServer:
    """aiohttp server: ``/ws`` (signaling), ``/healthz`` and ``/stats``."""

    def __init__(
        self, config: SignalingConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or SignalingConfig()
        self._limits = self.config.limits
        self._clock = clock
        self._rooms: RoomRegistry[Connection] = RoomRegistry(
            max_rooms=self._limits.max_rooms, peers_per_room=self._limits.peers_per_room
        )
        self._quotas = AddressQuotas(self._limits.per_address, clock)
        self._connections: set[Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        self._rejections: Counter[str] = Counter()
        self._connections_total = 0
        self._joins_total = 0
        self._replacements = 0
        self._messages_received = 0
        self._messages_forwarded = 0
        turn = self.config.turn
        self._turn = TurnIssuer(turn) if turn is not None and turn.enabled else None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Listen and return the actual port (``port=0`` picks a free one)."""
        if self._runner is not None:
            raise RuntimeError("signaling server already started")
        app = web.Application()
        app.router.add_get(WS_PATH, self._handle_websocket)
        app.router.add_get("/healthz", self._handle_health)
        app.router.add_get("/stats", self._handle_stats)
        ssl_context = self.config.ssl_context()  # before listening: a bad cert fails fast
        # keepalive_timeout: a TCP connection that sends no request within the join timeout
        # is closed too (aiohttp's default keeps a silent one for an hour).
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=FLUSH_TIMEOUT,
            keepalive_timeout=self._limits.join_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("signaling server listening on %s", self.url)
        if ssl_context is None and not _is_loopback(self.config.host):
            log.warning(
                "signaling on %s without TLS: join proofs can be recorded and the room secret"
                " guessed offline; pass --certfile/--keyfile to serve wss://",
                self.url,
            )
        return self._port

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("signaling server not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    async def close(self) -> None:
        """Send Shutdown to every client, close their sockets and stop listening."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing = True
        for conn in list(self._connections):
            conn.close_with(Shutdown(), code=WSCloseCode.GOING_AWAY, why="server shutting down")
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=self.config.shutdown_timeout)
        for conn in list(self._connections):
            conn.abort()
        await runner.cleanup()
        self._closing = False
        log.info("signaling server on port %s stopped", self._port)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/stats``: rooms, peers, traffic, rejections by reason, and per
        address (``per_address``: quota limits, top holders, top offenders, lockouts)."""
        return {
            "rooms": self._rooms.room_count,
            "peers": self._rooms.peer_count,
            "connections": len(self._connections),
            "connections_total": self._connections_total,
            "joins_total": self._joins_total,
            "replacements": self._replacements,
            "messages_received": self._messages_received,
            "messages_forwarded": self._messages_forwarded,
            "rejections": dict(self._rejections),
            "ice_issued": self._turn.issued if self._turn is not None else 0,
            "per_address": self._quotas.stats(),
        }

    # -- HTTP --------------------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    # -- WebSocket ---------------------------------------------------------------------

    async def _handle_websocket(self, request: web.Request) -> web.StreamResponse:
        limits = self._limits
        ws = web.WebSocketResponse(
            max_msg_size=limits.hard_frame_bytes,
            heartbeat=limits.heartbeat,
            compress=False,
        )
        await ws.prepare(request)
        self._connections_total += 1

        def abort_transport() -> None:
            if request.transport is not None:
                request.transport.abort()

        conn = Connection(
            ws,
            abort_transport,
            nonce=secrets.token_hex(32),
            address=address_key(request.remote),
            send_queue_limit=limits.send_queue,
            rate=TokenBucket(limits.messages_per_second, limits.burst, self._clock),
            rate_strikes=TokenBucket(STRIKE_REFILL_PER_SECOND, limits.rate_strikes, self._clock),
            protocol_strikes=TokenBucket(
                STRIKE_REFILL_PER_SECOND, limits.protocol_strikes, self._clock
            ),
        )
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._connections.add(conn)
        writer = asyncio.create_task(conn.write_loop(), name="signaling-writer")
        admitted = False
        try:
            if self._closing:
                conn.close_with(Shutdown(), code=WSCloseCode.GOING_AWAY)
            elif len(self._connections) > limits.max_connections:
                self._refuse(
                    conn,
                    Reason.TOO_MANY_CONNECTIONS,
                    f"the server holds its limit of {limits.max_connections} connections",
                    code=WSCloseCode.TRY_AGAIN_LATER,
                )
            elif (refusal := self._quotas.admit(conn.address)) is not None:
                self._refuse(
                    conn, refusal.reason, refusal.message, code=WSCloseCode.TRY_AGAIN_LATER
                )
            else:
                admitted = True
                conn.send(Challenge(nonce=conn.nonce))
                await self._read_loop(conn)
        except Exception:
            # A bug in handling one socket must never take the server down.
            log.exception("signaling socket handler failed")
        finally:
            self._leave(conn)
            if admitted:
                self._quotas.release(conn.address, joined=conn.joined)
            conn.close_with(None, code=WSCloseCode.OK)
            _done, pending = await asyncio.wait({writer}, timeout=FLUSH_TIMEOUT)
            if pending:
                conn.abort()
                writer.cancel()
                await asyncio.wait({writer})
            await ws.close()
            self._connections.discard(conn)
            self._handlers.discard(handler)
        return ws

    async def _read_loop(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        join_deadline = loop.time() + self._limits.join_timeout
        while not conn.closing:
            timeout: float | None = None
            if not conn.joined:
                timeout = join_deadline - loop.time()
                if timeout <= 0:
                    self._refuse_join_timeout(conn)
                    return
            try:
                msg = await conn.ws.receive(timeout=timeout)
            except TimeoutError:
                self._refuse_join_timeout(conn)
                return
            if msg.type is WSMsgType.TEXT:
                if not self._on_text(conn, msg.data):
                    return
                if not await conn.wait_for_room(OWN_BACKLOG_TIMEOUT):
                    self._count(conn, Reason.SLOW_CONSUMER)
                    conn.abort()
                    return
            elif msg.type is WSMsgType.BINARY:
                self._refuse(
                    conn, Reason.MALFORMED, "binary frames are not accepted; send JSON text"
                )
                return
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has already closed the socket (e.g. code 1009 above the hard cap).
                too_big = (
                    isinstance(msg.data, WebSocketError)
                    and msg.data.code == WSCloseCode.MESSAGE_TOO_BIG
                )
                self._count(conn, Reason.TOO_LARGE if too_big else Reason.MALFORMED)
                return
            else:  # CLOSE / CLOSING / CLOSED
                return

    def _refuse_join_timeout(self, conn: Connection) -> None:
        self._refuse(
            conn,
            Reason.JOIN_TIMEOUT,
            f"no valid join within {self._limits.join_timeout:g} s",
        )

    def _on_text(self, conn: Connection, text: str) -> bool:
        """Handle one text frame; False when the socket is being closed."""
        self._messages_received += 1
        data = text.encode("utf-8")
        if len(data) > self._limits.max_frame_bytes:
            return self._refuse(
                conn,
                Reason.TOO_LARGE,
                f"frame of {len(data)} bytes exceeds the {self._limits.max_frame_bytes} byte limit",
                code=WSCloseCode.MESSAGE_TOO_BIG,
            )
        if not conn.rate.take():
            self._count(conn, Reason.RATE_LIMITED)
            limit = f"{self._limits.messages_per_second:g} messages/s (burst {self._limits.burst})"
            if not conn.rate_strikes.take():
                self._count(conn, Reason.ABUSE)
                return self._refuse(
                    conn, Reason.RATE_LIMITED, f"repeatedly over {limit}; closing", count=False
                )
            return self._reply(conn, Reason.RATE_LIMITED, f"over {limit}; frame dropped")
        try:
            message = decode_client_message(data)
        except msgspec.ValidationError as exc:
            return self._strike(conn, Reason.WRONG_SCHEMA, str(exc)[:200])
        except msgspec.DecodeError as exc:
            return self._refuse(conn, Reason.MALFORMED, f"not JSON: {str(exc)[:160]}")
        if isinstance(message, Join):
            return self._on_join(conn, message)
        if isinstance(message, RefreshIce):
            return self._on_refresh_ice(conn)
        return self._on_signal(conn, message)

    def _on_join(self, conn: Connection, join: Join) -> bool:
        if conn.joined:
            return self._strike(conn, Reason.ALREADY_JOINED, "this socket has already joined")
        room, peer_id = join.room, join.peer_id
        if not room or len(room) > self._limits.max_room_length or not room.isprintable():
            return self._refuse(
                conn,
                Reason.BAD_ROOM,
                f"room names are 1-{self._limits.max_room_length} printable characters",
            )
        if not is_canonical_peer_id(peer_id):
            # One key, one id: any other spelling of a key would be a second room member.
            return self._refuse(
                conn, Reason.BAD_ID, "the peer id is not the canonical spelling of a key"
            )
        try:
            signature = bytes.fromhex(join.signature)
        except ValueError:
            signature = b""
        if not verify_signature(peer_id, signature, join_payload(conn.nonce, room, peer_id)):
            return self._refuse(
                conn,
                Reason.BAD_SIGNATURE,
                "the join signature does not prove the key behind this peer id",
            )
        secret = self.config.secret_for(room)
        if secret is not None and not self._check_secret(conn, secret, join):
            return False
        creating = not self._rooms.has_room(room)
        if not self._within_address_quota(conn, room, peer_id, creating=creating):
            return False
        refusal = self._rooms.admission_refusal(room, peer_id)
        if refusal == Reason.ROOM_FULL:
            return self._refuse(
                conn, refusal, f"room {room!r:.40} is full ({self._limits.peers_per_room} peers)"
            )
        if refusal is not None:
            return self._refuse(
                conn, refusal, f"the server holds its limit of {self._limits.max_rooms} rooms"
            )

        others = self._rooms.others(room, peer_id)
        previous = self._rooms.bind(room, peer_id, conn)
        conn.room, conn.peer_id = room, peer_id
        self._quotas.joined(conn.address)
        if creating:
            self._quotas.room_created(room, conn.address)
        self._joins_total += 1
        ice_servers, ice_expires = (
            self._turn.issue(peer_id) if self._turn is not None else (None, None)
        )
        conn.send(
            Joined(
                room=room,
                peer_id=peer_id,
                peers=sorted(others),
                ice_servers=ice_servers,
                ice_expires=ice_expires,
            )
        )
        if previous is not None:
            self._replacements += 1
            previous.close_with(
                Error(
                    reason=Reason.REPLACED,
                    message="another connection proved this peer id's key and took it over",
                ),
                code=WSCloseCode.POLICY_VIOLATION,
                why="replaced",
            )
        else:
            for other in others.values():
                self._deliver_control(other, PeerJoined(peer_id=peer_id))
        log.debug("peer %s joined room %r (%d others)", peer_id[:16], room, len(others))
        return True

    def _within_address_quota(
        self, conn: Connection, room: str, peer_id: str, *, creating: bool
    ) -> bool:
        """Refuse a join over its address's rooms or peers-per-room quota (False then)."""
        if self._rooms.lookup(room, peer_id) is not None:
            return True  # a proven replacement takes no new slot
        own = sum(
            1 for m in self._rooms.others(room, peer_id).values() if m.address == conn.address
        )
        quota = self._quotas.room_refusal(conn.address, creating=creating, peers_in_room=own)
        if quota is None:
            return True
        return self._refuse(conn, quota.reason, f"{quota.message}; not admitted to {room!r:.40}")

    def _check_secret(self, conn: Connection, secret: str, join: Join) -> bool:
        """Verify the room-secret proof, with a growing lockout per address for guessers."""
        guard = self._quotas.secrets
        locked = guard.remaining(conn.address)
        if locked > 0:
            # Not even a right proof is checked now, so guessing gains nothing while locked.
            return self._refuse(
                conn,
                Reason.LOCKED_OUT,
                f"{conn.address} is locked out after repeated wrong room secrets;"
                f" try again in {locked:.1f} s",
                code=WSCloseCode.TRY_AGAIN_LATER,
            )
        expected = secret_proof(secret, conn.nonce, join.peer_id).encode("ascii")
        offered = (join.secret_proof or "").encode("utf-8")
        if hmac.compare_digest(offered, expected):
            guard.succeeded(conn.address)
            return True
        what = "missing" if not join.secret_proof else "wrong"
        lockout = guard.failed(conn.address)
        then = f"; {conn.address} is now locked out for {lockout:g} s" if lockout else ""
        return self._refuse(
            conn, Reason.BAD_SECRET, f"room {join.room!r:.40} needs a secret: proof is {what}{then}"
        )

    def _on_signal(self, conn: Connection, signal: Signal) -> bool:
        if conn.room is None or conn.peer_id is None:
            return self._strike(conn, Reason.NOT_JOINED, "send a join before signalling")
        if not signal.to:
            return self._strike(conn, Reason.WRONG_SCHEMA, "a signal needs 'to'")
        target = None
        if signal.to != conn.peer_id:
            target = self._rooms.lookup(conn.room, signal.to)
        if target is None:
            self._count(conn, Reason.UNKNOWN_PEER)
            return self._reply(
                conn,
                Reason.UNKNOWN_PEER,
                f"no peer {signal.to[:16]!r} in room {conn.room!r:.40}",
                peer=signal.to,
            )
        # ``from`` is stamped from the socket's proven id; whatever the client sent is ignored.
        if target.send(Signal(data=signal.data, from_=conn.peer_id)):
            self._messages_forwarded += 1
            return True
        self._count(conn, Reason.PEER_BUSY)
        return self._reply(
            conn, Reason.PEER_BUSY, f"peer {signal.to[:16]!r} is not reading; signal not delivered"
        )

    def _on_refresh_ice(self, conn: Connection) -> bool:
        if conn.peer_id is None:
            return self._strike(conn, Reason.NOT_JOINED, "send a join before asking for ICE")
        servers, expires = self._turn.issue(conn.peer_id) if self._turn is not None else ([], None)
        self._deliver_control(conn, IceServers(ice_servers=servers, ice_expires=expires))
        return not conn.closing

    def _leave(self, conn: Connection) -> None:
        if conn.room is None or conn.peer_id is None:
            return
        if not self._rooms.unbind(conn.room, conn.peer_id, conn):
            return  # replaced: the id lives on in another socket
        if not self._rooms.has_room(conn.room):
            self._quotas.room_removed(conn.room)
        for other in self._rooms.others(conn.room, conn.peer_id).values():
            self._deliver_control(other, PeerLeft(peer_id=conn.peer_id))

    # -- replies -------------------------------------------------------------------------

    def _deliver_control(self, conn: Connection, message: msgspec.Struct) -> None:
        # A member that misses a membership frame would be out of sync: drop it instead.
        if not conn.send(message) and not conn.closing:
            self._count(conn, Reason.SLOW_CONSUMER)
            conn.abort()

    def _reply(self, conn: Connection, reason: str, message: str, peer: str | None = None) -> bool:
        """Tell the client what went wrong, keeping the socket open."""
        if conn.send(Error(reason=reason, message=message, peer=peer)):
            return True
        if not conn.closing:
            self._count(conn, Reason.SLOW_CONSUMER)
            conn.abort()
        return False

    def _strike(self, conn: Connection, reason: str, message: str) -> bool:
        """A protocol mistake: answered, and the socket closed once they repeat."""
        self._count(conn, reason)
        if conn.protocol_strikes.take():
            return self._reply(conn, reason, message)
        self._count(conn, Reason.ABUSE)
        return self._refuse(conn, reason, f"{message}; closing after repeated errors", count=False)

    def _count(self, conn: Connection, reason: str) -> None:
        """Count a refusal globally and against the address it came from."""
        self._rejections[reason] += 1
        self._quotas.offenders.record(conn.address, reason)

    def _refuse(
        self,
        conn: Connection,
        reason: str,
        message: str,
        *,
        code: int = WSCloseCode.POLICY_VIOLATION,
        count: bool = True,
    ) -> bool:
        """Send Error(reason) and close the socket; always False (the socket is done)."""
        if count:
            self._count(conn, reason)
        conn.close_with(Error(reason=reason, message=message), code=code, why=reason)
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
