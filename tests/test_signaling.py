"""Signaling server and client over real sockets on 127.0.0.1 (no stand-ins)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_notebook.errors import (
    SignalingError,
    SignalingRefused,
    SignalingTimeout,
    SignalingUnavailable,
)
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    Join,
    Joined,
    Signal,
    decode_server_message,
    encode,
    join_payload,
    secret_proof,
)
from swarm_notebook.signaling import (
    SignalingClient,
    SignalingConfig,
    SignalingLimits,
    SignalingServer,
)
from swarm_notebook.signaling.membership import RoomMembership
from tests.support.procs import child_processes
from tests.support.threaded_server import ThreadedServer

WAIT = 5.0


# -- helpers -------------------------------------------------------------------------------


class Recorder:
    """Collects a client's callback events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._changed = asyncio.Condition()

    async def add(self, *event: Any) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def wait_for(self, *event: Any, timeout: float = WAIT) -> None:
        await self.wait_until(lambda events: event in events, timeout=timeout)

    async def wait_until(
        self, predicate: Callable[[list[tuple[Any, ...]]], bool], timeout: float = WAIT
    ) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.events))

    def of_kind(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]

    async def on_signal(self, peer: str, data: dict[str, Any]) -> None:
        await self.add("signal", peer, data)

    async def on_peer_joined(self, peer: str) -> None:
        await self.add("joined", peer)

    async def on_peer_left(self, peer: str) -> None:
        await self.add("left", peer)

    async def on_error(self, reason: str, message: str) -> None:
        await self.add("error", reason)

    async def on_disconnected(self, reason: str) -> None:
        await self.add("disconnected", reason)

    async def on_undeliverable(self, peer: str) -> None:
        await self.add("undeliverable", peer)


ServerFactory = Callable[..., Awaitable[SignalingServer]]
ClientFactory = Callable[..., Awaitable[tuple[SignalingClient, Recorder]]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    servers: list[SignalingServer] = []

    async def factory(
        *,
        port: int = 0,
        secret: str | None = None,
        room_secrets: dict[str, str] | None = None,
        **limits: Any,
    ) -> SignalingServer:
        config = SignalingConfig(
            port=port,
            secret=secret,
            room_secrets=room_secrets or {},
            limits=SignalingLimits(**limits),
        )
        server = SignalingServer(config)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[SignalingClient] = []

    async def factory(
        url: str,
        room: str = "lab",
        identity: Identity | None = None,
        *,
        secret: str | None = None,
        start: bool = True,
        **options: Any,
    ) -> tuple[SignalingClient, Recorder]:
        recorder = Recorder()
        options.setdefault("backoff_initial", 0.05)
        options.setdefault("backoff_max", 0.3)
        options.setdefault("on_signal", recorder.on_signal)
        options.setdefault("on_peer_joined", recorder.on_peer_joined)
        options.setdefault("on_peer_left", recorder.on_peer_left)
        options.setdefault("on_error", recorder.on_error)
        options.setdefault("on_disconnected", recorder.on_disconnected)
        options.setdefault("on_undeliverable", recorder.on_undeliverable)
        client = SignalingClient(url, room, identity or Identity.generate(), secret, **options)
        clients.append(client)
        if start:
            await client.start(timeout=WAIT)
        return client, recorder

    yield factory
    for client in clients:
        await client.close()


class RawSockets:
    """Bare websockets for speaking the wire protocol by hand; all closed at teardown."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self._sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(url)
        self._sockets.append(ws)
        return ws

    async def close(self) -> None:
        for ws in self._sockets:
            await ws.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawSockets]:
    async with aiohttp.ClientSession() as session:
        sockets = RawSockets(session)
        yield sockets
        await sockets.close()


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT) -> Any:
    """The next server message, or the string "closed" once the socket is closed."""
    msg = await ws.receive(timeout=timeout)
    if msg.type is aiohttp.WSMsgType.TEXT:
        return decode_server_message(msg.data)
    return "closed"


async def raw_join(
    raw: RawSockets,
    url: str,
    room: str,
    identity: Identity,
    *,
    claim: str | None = None,
    secret: str | None = None,
) -> tuple[aiohttp.ClientWebSocketResponse, Any]:
    """Join over a bare websocket; ``claim`` is the peer id asserted (default: our own)."""
    ws = await raw.connect(url)
    challenge = await next_message(ws)
    assert isinstance(challenge, Challenge)
    peer_id = claim or identity.peer_id
    signature = identity.sign(join_payload(challenge.nonce, room, peer_id)).hex()
    proof = secret_proof(secret, challenge.nonce, peer_id) if secret else None
    await ws.send_str(
        encode(Join(room=room, peer_id=peer_id, signature=signature, secret_proof=proof))
    )
    return ws, await next_message(ws)


async def drain_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[Any]:
    seen = []
    while (message := await next_message(ws)) != "closed":
        seen.append(message)
    return seen


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll server-side state that no client can observe (e.g. a socket's cleanup)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - no event exists for this, by design
            await asyncio.sleep(0.01)


async def round_trip(
    a: tuple[SignalingClient, Recorder], b: tuple[SignalingClient, Recorder], tag: str
) -> None:
    """a -> b and b -> a, each seen by the other with the server-stamped sender."""
    (client_a, rec_a), (client_b, rec_b) = a, b
    await client_a.send_signal(client_b.peer_id, {"tag": tag})
    await rec_b.wait_for("signal", client_a.peer_id, {"tag": tag})
    await client_b.send_signal(client_a.peer_id, {"tag": tag + "-reply"})
    await rec_a.wait_for("signal", client_b.peer_id, {"tag": tag + "-reply"})


def stray_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


# -- joining and forwarding ----------------------------------------------------------------


async def test_two_peers_meet_and_exchange_signals_with_stamped_sender(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server()
    a = await make_client(server.url)
    b = await make_client(server.url, departure_grace=0.2)
    (client_a, rec_a), (client_b, rec_b) = a, b

    await rec_a.wait_for("joined", client_b.peer_id)
    await rec_b.wait_for("joined", client_a.peer_id)  # present before b joined
    assert client_a.members == {client_b.peer_id}
    assert client_b.members == {client_a.peer_id}
    await round_trip(a, b, "offer")

    # A peer that forges "from" has it replaced by its proven id.
    forger = Identity.generate()
    ws, joined = await raw_join(raw, server.url, "lab", forger)
    assert isinstance(joined, Joined)
    assert set(joined.peers) == {client_a.peer_id, client_b.peer_id}
    await ws.send_str(
        json.dumps(
            {"type": "signal", "to": client_b.peer_id, "from": client_a.peer_id, "data": {"x": 1}}
        )
    )
    await rec_b.wait_for("signal", forger.peer_id, {"x": 1})
    assert ("signal", client_a.peer_id, {"x": 1}) not in rec_b.events
    await ws.close()
    await rec_b.wait_for("left", forger.peer_id)

    assert client_a.stats()["signals_sent"] == 1
    assert client_b.stats()["signals_received"] == 2
    assert server.stats()["messages_forwarded"] == 3


async def test_real_departure_is_reported_after_the_grace(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    server = await make_server()
    client_a, rec_a = await make_client(server.url, departure_grace=0.2)
    client_b, _ = await make_client(server.url)
    await rec_a.wait_for("joined", client_b.peer_id)
    await client_b.close()
    await rec_a.wait_for("left", client_b.peer_id)
    assert client_a.members == frozenset()
    assert server.stats()["peers"] == 1


async def test_failing_callbacks_are_logged_and_never_stop_the_client(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    server = await make_server()

    def explode(peer: str) -> None:  # a plain function, not a coroutine
        raise RuntimeError(f"callback bug for {peer}")

    a = await make_client(server.url, on_peer_joined=explode)
    b = await make_client(server.url)
    await b[1].wait_for("joined", a[0].peer_id)
    await round_trip(a, b, "still-alive")
    assert a[0].stats()["callback_errors"] == 1
    assert a[0].members == {b[0].peer_id}


def test_membership_absorbs_a_blip_but_reports_a_real_departure() -> None:
    room = RoomMembership(grace=2.0)
    assert room.rejoined(["b", "c"], now=0.0).joined == ["b", "c"]
    blip = room.peer_left("b", now=1.0)
    assert blip.left == [] and room.members == {"b", "c"}
    assert room.peer_joined("b", now=2.0).joined == []  # back within the grace: silence
    assert room.rejoined(["b"], now=3.0).left == []  # c missing after our re-join
    assert room.next_deadline() == 5.0
    assert room.expire(now=4.9).left == []
    assert room.expire(now=5.0).left == ["c"]
    assert room.members == {"b"}
    assert room.peer_joined("c", now=6.0).joined == ["c"]  # a returning peer is news again


async def test_close_leaves_no_tasks_behind(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    server = await make_server()
    a = await make_client(server.url)
    b = await make_client(server.url)
    await round_trip(a, b, "x")
    await a[0].close()
    await b[0].close()
    await server.close()
    assert stray_tasks() == set()


# -- identity and secrets ------------------------------------------------------------------


async def test_claiming_another_peers_id_is_refused(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server()
    victim, rec_victim = await make_client(server.url)
    impostor = Identity.generate()

    ws, reply = await raw_join(raw, server.url, "lab", impostor, claim=victim.peer_id)
    assert isinstance(reply, Error) and reply.reason == "bad-signature"
    assert await next_message(ws) == "closed"

    ws, reply = await raw_join(raw, server.url, "lab", impostor, claim="not-a-peer-id")
    assert isinstance(reply, Error) and reply.reason == "bad-id"

    # The victim was never disturbed.
    assert victim.connected and rec_victim.of_kind("disconnected") == []
    assert server.stats()["rejections"]["bad-signature"] == 1
    assert server.stats()["rejections"]["bad-id"] == 1
    assert server.stats()["peers"] == 1


async def test_room_secrets_refuse_wrong_and_missing_proofs_for_good(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    server = await make_server(secret="team-secret", room_secrets={"vip": "vip-secret"})

    for secret in ("wrong", None):
        with pytest.raises(SignalingRefused) as refused:
            await make_client(server.url, secret=secret)
        assert refused.value.reason == "bad-secret"
        assert "needs a secret" in refused.value.message
    # Final refusals are not retried: exactly one attempt each.
    assert server.stats()["rejections"]["bad-secret"] == 2
    assert server.stats()["connections_total"] == 2

    with pytest.raises(SignalingRefused):
        await make_client(server.url, "vip", secret="team-secret")
    good, _ = await make_client(server.url, secret="team-secret")
    vip, _ = await make_client(server.url, "vip", secret="vip-secret")
    assert good.connected and vip.connected
    assert server.stats()["rooms"] == 2


async def test_second_socket_proving_the_key_replaces_the_first_without_flapping(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server()
    identity = Identity.generate()
    first, rec_first = await make_client(server.url, identity=identity)
    # The observer is a bare socket so every frame the server sends it is visible.
    observer = Identity.generate()
    observer_ws, joined = await raw_join(raw, server.url, "lab", observer)
    assert isinstance(joined, Joined) and joined.peers == [identity.peer_id]

    ws, joined = await raw_join(raw, server.url, "lab", identity)
    assert isinstance(joined, Joined) and joined.peers == [observer.peer_id]
    await rec_first.wait_for("disconnected", "replaced")
    # Not a final refusal any more: the client says so and would retry (see
    # test_electorate.py); stop it here so this test sees the server alone.
    assert first.refusal is None and first.identity_conflicts == 1
    assert first.stats()["identity_conflicts"] == 1
    await first.close()
    assert not first.connected
    # The old socket's cleanup is where a spurious PeerLeft would come from: let it finish.
    await wait_until(lambda: server.stats()["connections"] == 2)

    # The id now lives on the new socket, and the observer got nothing but the signal.
    await observer_ws.send_str(encode(Signal(data={"hello": "new socket"}, to=identity.peer_id)))
    forwarded = await next_message(ws)
    assert isinstance(forwarded, Signal)
    assert forwarded.from_ == observer.peer_id and forwarded.data == {"hello": "new socket"}
    await ws.send_str(encode(Signal(data={"ack": True}, to=observer.peer_id)))
    assert await next_message(observer_ws) == Signal(data={"ack": True}, from_=identity.peer_id)
    stats = server.stats()
    assert stats["replacements"] == 1 and stats["peers"] == 2
    # A second stale socket cannot take the id back without the key.
    _, reply = await raw_join(raw, server.url, "lab", Identity.generate(), claim=identity.peer_id)
    assert isinstance(reply, Error) and reply.reason == "bad-signature"
    await ws.send_str(encode(Signal(data={"still": "mine"}, to=observer.peer_id)))
    assert await next_message(observer_ws) == Signal(data={"still": "mine"}, from_=identity.peer_id)


# -- abuse ---------------------------------------------------------------------------------

FRAME_LIMIT = 4096


async def _garbage(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_str("hello, is this JSON?")


async def _binary(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_bytes(b"\x00\x01\x02")


async def _truncated(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_str('{"type": "join", "room": "la')


async def _oversized(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_str(json.dumps({"type": "signal", "to": "x", "data": {"pad": "x" * FRAME_LIMIT}}))


async def _wrong_schema(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_str('{"type": "hello", "peer_id": 7}')


async def _signal_before_join(ws: aiohttp.ClientWebSocketResponse, _: Identity) -> None:
    await ws.send_str(encode(Signal(data={}, to="someone")))


ABUSES = [
    # (name, action, expected reason, socket closed by the server)
    ("garbage", _garbage, "malformed", True),
    ("binary", _binary, "malformed", True),
    ("truncated", _truncated, "malformed", True),
    ("oversized", _oversized, "too-large", True),
    ("wrong-schema", _wrong_schema, "wrong-schema", False),
    ("signal-before-join", _signal_before_join, "not-joined", False),
]


@pytest.fixture
async def busy_room(
    make_server: ServerFactory, make_client: ClientFactory
) -> tuple[SignalingServer, tuple[SignalingClient, Recorder], tuple[SignalingClient, Recorder]]:
    server = await make_server(
        max_frame_bytes=FRAME_LIMIT, messages_per_second=5.0, burst=5, rate_strikes=3
    )
    a = await make_client(server.url)
    b = await make_client(server.url)
    await round_trip(a, b, "before")
    return server, a, b


async def get_rejections(raw: RawSockets, server: SignalingServer) -> dict[str, int]:
    async with raw.http.get(f"http://127.0.0.1:{server.port}/stats") as response:
        assert response.status == 200
        stats = await response.json()
    rejections: dict[str, int] = stats["rejections"]
    return rejections


@pytest.mark.parametrize(
    ("action", "reason", "closes"), [a[1:] for a in ABUSES], ids=[a[0] for a in ABUSES]
)
async def test_bad_frames_get_a_reason_and_never_disturb_the_room(
    busy_room: Any,
    raw: RawSockets,
    action: Callable[[aiohttp.ClientWebSocketResponse, Identity], Awaitable[None]],
    reason: str,
    closes: bool,
) -> None:
    server, a, b = busy_room
    before = await get_rejections(raw, server)
    ws = await raw.connect(server.url)
    challenge = await next_message(ws)
    assert isinstance(challenge, Challenge)

    await action(ws, Identity.generate())
    reply = await next_message(ws)
    assert isinstance(reply, Error), reply
    assert reply.reason == reason and reply.message
    if closes:
        assert await next_message(ws) == "closed"
    else:  # a protocol mistake is answered, and the socket can still join afterwards
        intruder = Identity.generate()
        signature = intruder.sign(join_payload(challenge.nonce, "lab", intruder.peer_id)).hex()
        await ws.send_str(encode(Join(room="lab", peer_id=intruder.peer_id, signature=signature)))
        assert isinstance(await next_message(ws), Joined)
        await ws.close()

    after = await get_rejections(raw, server)
    assert after.get(reason, 0) == before.get(reason, 0) + 1
    await round_trip(a, b, "after-" + reason)
    assert a[0].connected and b[0].connected


async def test_client_refuses_to_send_an_oversized_signal(busy_room: Any) -> None:
    _, (client_a, _), (client_b, _) = busy_room
    with pytest.raises(SignalingError) as too_large:
        await client_a.send_signal(client_b.peer_id, {"pad": "x" * 70_000})
    assert too_large.value.reason == "too-large"
    assert client_a.stats()["signals_sent"] == 1  # only the round trip's


async def test_frame_beyond_the_hard_cap_is_cut_off_and_counted(
    busy_room: Any, raw: RawSockets
) -> None:
    server, a, b = busy_room
    ws = await raw.connect(server.url)
    assert isinstance(await next_message(ws), Challenge)
    await ws.send_str("x" * (FRAME_LIMIT * 5))
    assert await next_message(ws) == "closed"
    assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await wait_until(lambda: server.stats()["rejections"].get("too-large") == 1)
    await round_trip(a, b, "after-hard-cap")


async def test_unknown_target_is_answered_and_counted(busy_room: Any, raw: RawSockets) -> None:
    server, a, b = busy_room
    ws, joined = await raw_join(raw, server.url, "lab", Identity.generate())
    assert isinstance(joined, Joined)
    await ws.send_str(encode(Signal(data={}, to=Identity.generate().peer_id)))
    reply = await next_message(ws)
    assert isinstance(reply, Error) and reply.reason == "unknown-peer"
    assert server.stats()["rejections"]["unknown-peer"] == 1
    # The client API reports the same through on_error, and names the peer it could not reach.
    client_a, rec_a = a
    missing = Identity.generate().peer_id
    await client_a.send_signal(missing, {"lost": True})
    await rec_a.wait_for("error", "unknown-peer")
    await rec_a.wait_for("undeliverable", missing)
    await round_trip(a, b, "after-unknown")
    await ws.close()


async def test_a_flood_is_rate_limited_then_cut_off(busy_room: Any, raw: RawSockets) -> None:
    server, a, b = busy_room
    flooder = Identity.generate()
    forwarded_before = server.stats()["messages_forwarded"]
    ws, joined = await raw_join(raw, server.url, "lab", flooder)
    assert isinstance(joined, Joined)
    for _ in range(40):
        await ws.send_str(encode(Signal(data={"spam": True}, to=b[0].peer_id)))
    replies = await drain_until_closed(ws)
    reasons = [r.reason for r in replies if isinstance(r, Error)]
    # burst 5 (one spent on the join), then 3 tolerated violations, then the cut-off.
    assert reasons == ["rate-limited"] * 4
    stats = server.stats()
    assert stats["rejections"]["rate-limited"] == 4
    assert stats["rejections"]["abuse"] == 1
    # Frames within the budget were delivered; every other one was answered, none vanished.
    delivered = stats["messages_forwarded"] - forwarded_before
    assert delivered == 4
    await b[1].wait_until(
        lambda events: sum(1 for e in events if e[:2] == ("signal", flooder.peer_id)) == delivered
    )
    await round_trip(a, b, "after-flood")


# -- room limits ---------------------------------------------------------------------------


async def test_room_and_server_limits(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server(peers_per_room=2, max_rooms=2, max_room_length=16)
    await make_client(server.url, "r")
    await make_client(server.url, "r")
    await make_client(server.url, "s")

    _, reply = await raw_join(raw, server.url, "r", Identity.generate())
    assert isinstance(reply, Error) and reply.reason == "room-full"
    _, reply = await raw_join(raw, server.url, "t", Identity.generate())
    assert isinstance(reply, Error) and reply.reason == "too-many-rooms"
    _, reply = await raw_join(raw, server.url, "x" * 17, Identity.generate())
    assert isinstance(reply, Error) and reply.reason == "bad-room"

    # The client retries a full room (it may free up) and explains a timeout.
    with pytest.raises(SignalingTimeout) as timed_out:
        await (await make_client(server.url, "r", start=False))[0].start(timeout=0.5)
    assert "room-full" in str(timed_out.value)
    rejections = server.stats()["rejections"]
    assert rejections["too-many-rooms"] == 1 and rejections["bad-room"] == 1
    assert rejections["room-full"] >= 2


async def test_silent_sockets_and_excess_connections_are_turned_away(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server(join_timeout=0.3, max_connections=2)
    await make_client(server.url)
    silent = await raw.connect(server.url)
    assert isinstance(await next_message(silent), Challenge)
    excess = await raw.connect(server.url)
    reply = await next_message(excess)
    assert isinstance(reply, Error) and reply.reason == "too-many-connections"
    reply = await next_message(silent)
    assert isinstance(reply, Error) and reply.reason == "join-timeout"
    assert await next_message(silent) == "closed"
    rejections = server.stats()["rejections"]
    assert rejections == {"too-many-connections": 1, "join-timeout": 1}


async def test_a_peer_that_stops_reading_is_dropped_not_waited_for(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server(send_queue=4, messages_per_second=1e6, burst=1_000_000)
    a = await make_client(server.url)
    stalled = Identity.generate()
    stalled_ws, _ = await raw_join(raw, server.url, "lab", stalled)  # never read again
    sender_ws, _ = await raw_join(raw, server.url, "lab", Identity.generate())
    chunk = {"pad": "x" * 60_000}
    busy = None
    for _ in range(2000):  # enough to fill the socket buffers on the way to the stalled peer
        await sender_ws.send_str(encode(Signal(data=chunk, to=stalled.peer_id)))
        if server.stats()["rejections"].get("peer-busy"):
            break
    while not isinstance(busy := await next_message(sender_ws), Error):
        pass
    assert busy.reason == "peer-busy"
    # A membership frame it cannot take drops the stalled socket; everyone else carries on.
    b = await make_client(server.url)
    await wait_until(lambda: server.stats()["rejections"].get("slow-consumer") == 1)
    await round_trip(a, b, "after-stall")
    assert server.stats()["peers"] == 3  # a, b and the sender
    delivered = await drain_until_closed(stalled_ws)  # what reached it before the drop
    assert 0 < len(delivered) < 2000


# -- HTTP endpoints ------------------------------------------------------------------------


async def test_health_and_stats_over_http(
    make_server: ServerFactory, make_client: ClientFactory, raw: RawSockets
) -> None:
    server = await make_server()
    async with raw.http.get(f"http://127.0.0.1:{server.port}/healthz") as response:
        assert response.status == 200 and await response.text() == "ok"
    a = await make_client(server.url)
    b = await make_client(server.url, "other")
    c = await make_client(server.url, "other")
    await round_trip(b, c, "s")
    async with raw.http.get(f"http://127.0.0.1:{server.port}/stats") as response:
        stats = await response.json()
    assert stats["rooms"] == 2 and stats["peers"] == 3
    assert stats["connections_total"] == 3 and stats["joins_total"] == 3
    assert stats["messages_forwarded"] == 2
    assert stats["rejections"] == {}
    assert a[0].connected


# -- outages -------------------------------------------------------------------------------


async def test_clients_rejoin_after_a_server_restart_without_membership_events(
    make_server: ServerFactory, make_client: ClientFactory
) -> None:
    first = await make_server()
    port = first.port
    a = await make_client(first.url)
    b = await make_client(first.url)
    (client_a, rec_a), (client_b, rec_b) = a, b
    await round_trip(a, b, "before")

    await first.close()
    await rec_a.wait_for("disconnected", "shutdown")
    await rec_b.wait_for("disconnected", "shutdown")
    assert not client_a.connected
    with pytest.raises(SignalingUnavailable):
        await client_a.send_signal(client_b.peer_id, {})
    assert client_a.members == {client_b.peer_id}  # kept through the outage

    second = await make_server(port=port)
    await client_a.wait_connected(WAIT)
    await client_b.wait_connected(WAIT)
    await round_trip(a, b, "after")

    for rec, other in ((rec_a, client_b), (rec_b, client_a)):
        assert rec.of_kind("left") == []
        assert rec.of_kind("joined") == [("joined", other.peer_id)]
    assert client_a.stats()["reconnects"] == 1 and client_b.stats()["reconnects"] == 1
    assert second.stats()["peers"] == 2

    await client_a.close()
    await client_b.close()
    await second.close()
    assert stray_tasks() == set()


async def test_cli_prints_its_url_and_stops_cleanly_on_sigterm(make_client: ClientFactory) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarm_notebook.cli.main",
        "signal",
        "--port",
        "0",
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        match = re.search(r"ws://127\.0\.0\.1:\d+/ws", line)
        assert match, line
        client, rec = await make_client(match.group(0))
        proc.send_signal(signal.SIGTERM)
        await rec.wait_for("disconnected", "shutdown")
        assert await asyncio.wait_for(proc.wait(), 5) == 0, await proc.stderr.read()
        assert client.stats()["shutdowns_received"] == 1
        assert not client.connected
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert child_processes() == []


# -- fuzz ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer(SignalingLimits(max_frame_bytes=FRAME_LIMIT), call_timeout=30)
    yield server
    server.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["join", "signal", "joined", "error", "nope"])},
    optional={
        key: json_values | st.text(max_size=60)
        for key in ("room", "peer_id", "signature", "secret_proof", "to", "from", "data")
    },
).map(json.dumps)
frames = st.text(max_size=200) | json_values.map(json.dumps) | message_like


async def _send_one(server: ThreadedServer, frame: str) -> Any:
    ws = await server.http.ws_connect(server.server.url)
    try:
        assert isinstance(await next_message(ws), Challenge)
        await ws.send_str(frame)
        return await next_message(ws)
    finally:
        await ws.close()


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(frame=frames)
def test_fuzzed_frames_always_get_an_error_reply(
    threaded_server: ThreadedServer, frame: str
) -> None:
    reply = threaded_server.call(_send_one(threaded_server, frame))
    assert isinstance(reply, Error), (frame, reply)
    assert reply.reason in {
        "malformed",
        "wrong-schema",
        "not-joined",
        "bad-signature",
        "bad-room",
        "too-large",
    }


def test_server_still_serves_after_the_fuzz(threaded_server: ThreadedServer) -> None:
    async def join_and_look() -> tuple[Any, dict[str, Any]]:
        assert isinstance(await _send_one(threaded_server, "{not json"), Error)
        raw = RawSockets(threaded_server.http)
        _, joined = await raw_join(raw, threaded_server.server.url, "lab", Identity.generate())
        await raw.close()
        return joined, threaded_server.server.stats()

    joined, stats = threaded_server.call(join_and_look())
    assert isinstance(joined, Joined)
    assert sum(stats["rejections"].values()) >= 1
