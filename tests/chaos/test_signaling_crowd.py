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
