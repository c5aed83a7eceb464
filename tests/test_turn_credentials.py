"""TURN credentials issued by the signaling server (real server and clients on loopback).

That coturn accepts these credentials is proven in ``test_netbed.py`` (real coturn).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from swarm_notebook.cli import signal as signal_cli
from swarm_notebook.identity import Identity
from swarm_notebook.signaling import SignalingClient, SignalingConfig, SignalingServer
from swarm_notebook.signaling.turn_credentials import TurnConfig, TurnIssuer, turn_password
from swarm_notebook.transport.mesh import MeshConfig, MeshTransport

TURN_URL = "turn:198.51.100.7:3478"
STUN_URL = "stun:198.51.100.7:3478"
WAIT = 10.0


def test_credentials_follow_coturns_rest_api_scheme() -> None:
    issuer = TurnIssuer(
        TurnConfig(urls=(TURN_URL,), secret="north", ttl_s=600, stun_urls=(STUN_URL,)),
        clock=lambda: 1_700_000_000.4,
    )
    servers, expires = issuer.issue("peer-one")
    assert servers[0] == {"urls": STUN_URL}
    turn = servers[1]
    assert turn["username"] == "1700000600:peer-one" and expires == 1_700_000_600
    mac = hmac.new(b"north", b"1700000600:peer-one", hashlib.sha1).digest()
    assert (
        turn["credential"]
        == base64.b64encode(mac).decode()
        == turn_password("north", turn["username"])
    )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"urls": (TURN_URL,)}, "needs --turn-secret"),
        ({"secret": "s"}, "needs at least one --turn-url"),
        ({"urls": ("stun:x",), "secret": "s"}, "expects turn:"),
        ({"urls": (TURN_URL,), "secret": "s", "ttl_s": 5}, "at least 60"),
        ({"stun_urls": ("turn:x",)}, "expects stun:"),
    ],
)
def test_bad_server_settings_are_refused(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        TurnConfig(**kwargs)


def test_signal_cli_builds_the_turn_config() -> None:
    parser = argparse.ArgumentParser()
    signal_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--ice-server",
            STUN_URL,
            "--turn-url",
            TURN_URL,
            "--turn-secret",
            "s",
            "--turn-ttl",
            "120",
        ]
    )
    config = signal_cli.config_from_args(args)
    assert config.turn == TurnConfig(urls=(TURN_URL,), secret="s", ttl_s=120, stun_urls=(STUN_URL,))
    assert signal_cli.config_from_args(parser.parse_args([])).turn is None


@pytest.fixture
async def issuing_server() -> AsyncIterator[SignalingServer]:
    turn = TurnConfig(urls=(TURN_URL,), secret="s3cret", ttl_s=60, stun_urls=(STUN_URL,))
    server = SignalingServer(SignalingConfig(port=0, turn=turn))
    await server.start()
    yield server
    await server.close()


async def test_join_acknowledgement_carries_credentials_and_the_client_renews_them(
    issuing_server: SignalingServer,
) -> None:
    received: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    identity = Identity.generate()
    # The client believes 57 of the 60 s are gone: it asks for renewal in ~2.4 s.
    client = SignalingClient(
        issuing_server.url, "lab", identity, on_ice_servers=received.put,
        wall_clock=lambda: time.time() + 57,
    )  # fmt: skip
    await client.start()
    try:
        first = await asyncio.wait_for(received.get(), WAIT)
        assert first[0] == {"urls": STUN_URL}
        user = first[1]["username"]
        assert user.endswith(f":{identity.peer_id}")
        assert first[1]["credential"] == turn_password("s3cret", user)
        renewed = await asyncio.wait_for(received.get(), WAIT)
        assert renewed[1]["username"].endswith(f":{identity.peer_id}")
        assert client.stats()["ice_renewals_asked"] >= 1
        assert issuing_server.stats()["ice_issued"] >= 2
        assert client.ice_servers == renewed
    finally:
        await client.close()


async def test_a_server_without_turn_issues_nothing(server: SignalingServer) -> None:
    received: list[Any] = []
    client = SignalingClient(server.url, "lab", Identity.generate(), on_ice_servers=received.append)
    await client.start()
    await client.close()
    assert received == [] and client.ice_servers == []
    assert server.stats()["ice_issued"] == 0


async def test_refresh_before_join_is_a_protocol_strike(issuing_server: SignalingServer) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(issuing_server.url) as ws:
        await ws.receive()  # challenge
        await ws.send_str('{"type": "refresh-ice"}')
        reply = await asyncio.wait_for(ws.receive(), WAIT)
    assert '"not-joined"' in reply.data
    assert issuing_server.stats()["ice_issued"] == 0


def _mesh(config: MeshConfig) -> MeshTransport:
    class NoSignaling:
        members: frozenset[str] = frozenset()
        connected = False

        async def start(self) -> None: ...
        async def close(self) -> None: ...
        async def send_signal(self, to: str, data: dict[str, Any]) -> None: ...

    return MeshTransport(Identity.generate(), lambda *callbacks: NoSignaling(), config)


async def test_peer_side_servers_win_over_issued_ones() -> None:
    own = _mesh(MeshConfig(ice_servers=[{"urls": "stun:own.example"}]))
    own.set_issued_ice_servers([{"urls": STUN_URL}])
    assert [s.url for s in own.ice_servers] == ["stun:own.example"]
    bare = _mesh(MeshConfig())
    bare.set_issued_ice_servers([{"urls": STUN_URL}])
    assert [s.url for s in bare.ice_servers] == [STUN_URL]
    bare.set_issued_ice_servers([{"urls": "turn:no-credentials.example"}])
    assert [s.url for s in bare.ice_servers] == [STUN_URL]  # kept the usable ones
    assert bare.rejections.by_reason["bad-ice-config"] == 1
