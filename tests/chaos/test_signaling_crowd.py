"""200 clients connect to one signaling server at once; a fifth of them send garbage.

The good ones are real ``SignalingClient``s (key-proven joins); the bad ones are bare
aiohttp websockets speaking broken protocol. Every good client must join and see every
other good one, the server's stats must agree, and every bad socket must be refused with
its reason and counted under it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from swarm_notebook.identity import Identity
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    Join,
    Signal,
    decode_server_message,
    encode,
    join_payload,
)
from swarm_notebook.signaling import (
    SignalingClient,
    SignalingConfig,
    SignalingLimits,
    SignalingServer,
)
from swarm_notebook.signaling.quotas import QuotaLimits
from tests.chaos.helpers import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

CLIENTS = 200
BAD = CLIENTS // 5
GOOD = CLIENTS - BAD
ROOM = "crowd"


def garbage_kinds() -> dict[str, Callable[[str], str | bytes]]:
    """Broken first frames, by the reason the server must give (given the challenge nonce)."""
    stranger = Identity.generate()
    victim = Identity.generate()

    def bad_signature(nonce: str) -> str:
        signature = stranger.sign(join_payload(nonce, ROOM, victim.peer_id)).hex()
        return encode(Join(room=ROOM, peer_id=victim.peer_id, signature=signature))

    return {
        "malformed": lambda nonce: "{this is not json",
        "malformed-binary": lambda nonce: b"\x00\x01binary",
        "bad-signature": bad_signature,
        "too-large": lambda nonce: encode(Signal(data={"x": "y" * 100_000}, to="z")),
        "not-joined": lambda nonce: encode(Signal(data={"kind": "offer"}, to=victim.peer_id)),
        "wrong-schema": lambda nonce: '{"type": "join", "room": 7}',
        "bad-room": lambda nonce: encode(
            Join(
                room="\x00",
                peer_id=stranger.peer_id,
                signature=stranger.sign(join_payload(nonce, "\x00", stranger.peer_id)).hex(),
            )
        ),
    }


async def send_garbage(
    http: aiohttp.ClientSession, url: str, kind: str, make: Callable[[str], str | bytes]
) -> str:
    """Send one broken frame; returns the reason the server answered with."""
    ws = await http.ws_connect(url)
    try:
        msg = await ws.receive(timeout=30)
        challenge = decode_server_message(msg.data)
        assert isinstance(challenge, Challenge)
        frame = make(challenge.nonce)
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)
        msg = await ws.receive(timeout=30)
        assert msg.type is aiohttp.WSMsgType.TEXT, (kind, msg)
        reply = decode_server_message(msg.data)
        assert isinstance(reply, Error), (kind, reply)
        return reply.reason
    finally:
        await ws.close()


async def test_200_clients_at_once_good_ones_all_join_garbage_is_refused_and_counted() -> None:
    # One room holds everyone (the default room limit, 64, is for a team), and all of them
    # come from 127.0.0.1, so the per-address quotas (for a team, too) are lifted as well.
    lifted = QuotaLimits(
        connections_per_address=CLIENTS,
        pending_per_address=CLIENTS,
        peers_per_room_per_address=CLIENTS,
    )
    limits = SignalingLimits(peers_per_room=CLIENTS, per_address=lifted)
    server = SignalingServer(SignalingConfig(port=0, limits=limits))
    await server.start()
    kinds = list(garbage_kinds().items())
    plan = [kinds[i % len(kinds)] for i in range(BAD)]
    clients = [
        SignalingClient(server.url, ROOM, Identity.generate(), backoff_initial=0.05)
        for _ in range(GOOD)
    ]
    try:
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            # Good and bad interleaved, all started together.
            outcomes: list[Any] = await asyncio.gather(
                *(client.start(timeout=60) for client in clients),
                *(send_garbage(http, server.url, kind, make) for kind, make in plan),
            )
            joined_s = time.monotonic() - started
        reasons = Counter(r for r in outcomes[GOOD:])
        expected = Counter(kind.removesuffix("-binary") for kind, _ in plan)
        assert reasons == expected, (reasons, expected)
        assert all(client.connected for client in clients)

        ids = {client.peer_id for client in clients}
        await wait_until(
            lambda: all(client.members == ids - {client.peer_id} for client in clients),
            60,
            f"every client to see the other {GOOD - 1}",
        )
        converged_s = time.monotonic() - started
        stats = server.stats()
        assert stats["peers"] == GOOD and stats["rooms"] == 1
        assert stats["joins_total"] == GOOD
        assert stats["connections_total"] == CLIENTS
        # Each garbage socket is counted once, under its own reason; nothing else is.
        assert stats["rejections"] == dict(expected), stats["rejections"]
        assert all(client.stats()["reconnects"] == 0 for client in clients)
        print(
            f"\n[chaos] {CLIENTS} clients at once: {GOOD} joined in {joined_s:.1f} s, all saw "
            f"{GOOD - 1} peers after {converged_s:.1f} s; {BAD} garbage sockets refused "
            f"{dict(reasons)}; server stats peers={stats['peers']} "
            f"joins={stats['joins_total']} connections={stats['connections_total']}"
        )
    finally:
        await asyncio.gather(*(client.close() for client in clients))
        await server.close()
    assert server.stats()["peers"] == 0


FLOOD_ADDRESSES = [f"127.0.0.{i}" for i in range(3, 7)]
KEY_FLOODER = "127.0.0.2"
SILENT_PER_ADDRESS = 200
HONEST = 24


async def _next(ws: aiohttp.ClientWebSocketResponse) -> Any:
    msg = await ws.receive(timeout=30)
    return decode_server_message(msg.data) if msg.type is aiohttp.WSMsgType.TEXT else "closed"


async def _key_flood(
    http: aiohttp.ClientSession, url: str, keys: int, held: list[aiohttp.ClientWebSocketResponse]
) -> Counter[str]:
    """Throwaway keys join the room one after another; every socket is kept in ``held``
    (a websocket nobody references is closed when it is collected)."""
    answers: Counter[str] = Counter()
    for _ in range(keys):
        identity = Identity.generate()
        ws = await http.ws_connect(url)
        held.append(ws)
        challenge = await _next(ws)
        signature = identity.sign(join_payload(challenge.nonce, ROOM, identity.peer_id)).hex()
        await ws.send_str(encode(Join(room=ROOM, peer_id=identity.peer_id, signature=signature)))
        reply = await _next(ws)
        answers[reply.reason if isinstance(reply, Error) else type(reply).__name__] += 1
    return answers


async def _socket_flood(
    http: aiohttp.ClientSession, url: str
) -> tuple[Counter[str], list[aiohttp.ClientWebSocketResponse]]:
    """Sockets that never join, all at once; returns the first answers and the sockets."""
    sockets = await asyncio.gather(*(http.ws_connect(url) for _ in range(SILENT_PER_ADDRESS)))
    replies = await asyncio.gather(*(_next(ws) for ws in sockets))
    answers = Counter(r.reason if isinstance(r, Error) else type(r).__name__ for r in replies)
    return answers, [ws for ws, r in zip(sockets, replies, strict=True) if isinstance(r, Challenge)]


def _session(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), limit=0))


async def test_floods_from_other_addresses_leave_room_for_an_honest_team() -> None:
    """Issue 10, finding 7, all at once with the default limits: a key flood from one
    address and socket floods from four others, while a team from 127.0.0.1 joins."""
    limits = SignalingLimits(join_timeout=2.0)
    quotas = limits.per_address
    server = SignalingServer(SignalingConfig(port=0, limits=limits))
    await server.start()
    team = [
        SignalingClient(server.url, ROOM, Identity.generate(), backoff_initial=0.05)
        for _ in range(HONEST)
    ]
    sessions = {address: _session(address) for address in [KEY_FLOODER, *FLOOD_ADDRESSES]}
    held: list[aiohttp.ClientWebSocketResponse] = []
    try:
        started = time.monotonic()
        results: list[Any] = await asyncio.gather(
            _key_flood(sessions[KEY_FLOODER], server.url, limits.peers_per_room, held),
            *(_socket_flood(sessions[a], server.url) for a in FLOOD_ADDRESSES),
            *(client.start(timeout=60) for client in team),
        )
        team_joined_s = time.monotonic() - started
        keys, floods = results[0], results[1 : 1 + len(FLOOD_ADDRESSES)]
        allowed = quotas.peers_per_room_per_address
        assert keys == {"Joined": allowed, "too-many-peers-from-address": 64 - allowed}
        for answers, _ in floods:
            assert answers == {
                "Challenge": quotas.pending_per_address,
                "too-many-pending": SILENT_PER_ADDRESS - quotas.pending_per_address,
            }
        ids = {client.peer_id for client in team}
        await wait_until(
            lambda: all(ids - {c.peer_id} <= c.members for c in team), 30, "the team to meet"
        )
        assert all(client.stats()["reconnects"] == 0 for client in team)

        # The silent sockets are told why and closed at the deadline; the team relays on.
        silent = [ws for _, sockets in floods for ws in sockets]
        closing = await asyncio.gather(*(_next(ws) for ws in silent))
        assert {r.reason for r in closing if isinstance(r, Error)} == {"join-timeout"}
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        receiver = SignalingClient(
            server.url, ROOM, Identity.generate(), on_signal=lambda p, d: inbox.put_nowait(d)
        )
        team.append(receiver)
        await receiver.start(timeout=30)
        await team[0].send_signal(receiver.peer_id, {"tag": "after-the-floods"})
        async with asyncio.timeout(30):
            assert await inbox.get() == {"tag": "after-the-floods"}

        stats = server.stats()
        flooded = len(FLOOD_ADDRESSES) * (SILENT_PER_ADDRESS - quotas.pending_per_address)
        assert stats["rejections"] == {
            "too-many-peers-from-address": 64 - allowed,
            "too-many-pending": flooded,
            "join-timeout": len(FLOOD_ADDRESSES) * quotas.pending_per_address,
        }
        assert stats["peers"] == allowed + HONEST + 1
        offenders = {row["address"] for row in stats["per_address"]["top_offenders"]}
        assert offenders == {KEY_FLOODER, *FLOOD_ADDRESSES}  # the team is nowhere in it
        print(
            f"\n[chaos] key flood (64 keys) from {KEY_FLOODER}: {dict(keys)}; "
            f"{SILENT_PER_ADDRESS} silent sockets from each of {len(FLOOD_ADDRESSES)} addresses:"
            f" {dict(floods[0][0])} each, closed after {limits.join_timeout:g} s; "
            f"{HONEST} honest clients from 127.0.0.1 all joined in {team_joined_s:.1f} s"
        )
    finally:
        await asyncio.gather(*(client.close() for client in team))
        for http in sessions.values():
            await http.close()
        await server.close()
