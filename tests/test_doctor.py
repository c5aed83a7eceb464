"""doctor's signaling check against real servers on loopback (plain, wrong, and bad TLS)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from swarm_notebook.signaling import SignalingServer
from swarm_notebook.views.doctor import check_signaling, link_checks, render
from tests.support.certs import self_signed_cert


def self_signed(directory: Path, for_loopback: bool = False) -> tuple[Path, Path]:
    """Valid for 127.0.0.1 when ``for_loopback``, else only for another host's name."""
    return self_signed_cert(
        directory,
        "cert",
        common_name="not-this-host.example",
        dns=(),
        ips=("127.0.0.1",) if for_loopback else (),
    )


@pytest.fixture(params=[False, True], ids=["other-host", "loopback"])
async def tls_site(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[int, bool]]:
    """A WebSocket endpoint behind a self-signed certificate (for 127.0.0.1 or not)."""
    cert, key = self_signed(tmp_path, for_loopback=request.param)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        response = web.WebSocketResponse()
        await response.prepare(request)
        await response.send_str('{"type": "challenge", "nonce": "00"}')
        await response.close()
        return response

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(runner.addresses[0][1]), request.param
    finally:
        await runner.cleanup()


async def test_a_running_signaling_server_passes(server: SignalingServer) -> None:
    check = await check_signaling(server.url)
    assert check.ok and check.detail == f"{server.url} answers"


async def test_nothing_listening_is_unreachable_with_advice() -> None:
    check = await check_signaling("ws://127.0.0.1:9/ws", timeout=3)
    assert not check.ok and "not reachable" in check.detail
    assert check.advice is not None and "swarm-notebook signal" in check.advice


async def test_an_invalid_tls_certificate_is_named(
    tls_site: tuple[int, bool], tmp_path: Path
) -> None:
    port, for_loopback = tls_site
    url = f"wss://127.0.0.1:{port}/ws"
    check = await check_signaling(url, timeout=5)
    assert not check.ok and "TLS certificate not valid" in check.detail, check
    assert check.advice is not None and "--ca-file" in check.advice
    trusted = await check_signaling(url, timeout=5, ca_file=str(tmp_path / "cert.pem"))
    if for_loopback:  # trusted and issued for this host: valid
        assert trusted.ok and "TLS certificate valid" in trusted.detail, trusted
    else:  # trusted, but for another host name: still not valid
        assert not trusted.ok and "TLS certificate not valid" in trusted.detail, trusted


async def test_a_web_server_that_is_no_signaling_server_is_told_apart(tmp_path: Path) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/ws", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        check = await check_signaling(f"ws://127.0.0.1:{runner.addresses[0][1]}/ws", timeout=3)
    finally:
        await runner.cleanup()
    assert not check.ok and "not reachable" in check.detail  # the upgrade is refused


def test_link_lines_carry_route_server_rtt_and_bytes() -> None:
    stats = {
        "peers": [
            {
                "id": "p" * 52,
                "state": "connected",
                "route": "relay",
                "local_candidate": "relay",
                "remote_candidate": "srflx",
                "ice_server": "turn:203.0.113.9:3478",
                "rtt_ms": 41.25,
                "bytes_in": 2048,
                "bytes_out": 512,
            },
            {"id": "q" * 52, "state": "connecting"},
        ]
    }
    text = render(link_checks(stats))
    assert (
        f"ok   link {'p' * 16}: relay (relay -> srflx) via turn:203.0.113.9:3478, rtt 41.2 ms,"
        " 2048 B in / 512 B out"
    ) in text
    assert f"FAIL link {'q' * 16}: state connecting" in text
