"""TLS on the signaling server (``wss://``) and certificate checks on the client.

Certificates are made for each test with ``cryptography`` in a temporary folder. Finding 9
of issue 10: join proofs travelled over plain ``ws://``, so anyone on the path could
record them and guess the room secret offline.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import swarm_notebook.environment as environment
from swarm_notebook.errors import SignalingTLSError
from swarm_notebook.identity import Identity
from swarm_notebook.signaling import SignalingClient, SignalingConfig, SignalingServer
from tests.support.certs import self_signed_cert
from tests.support.signal_cli import cli_signal_server

WAIT = 10.0


@dataclass(frozen=True)
class Cert:
    certfile: Path
    keyfile: Path


def make_cert(folder: Path, name: str, *, ip: bool = True) -> Cert:
    """A self-signed certificate for ``localhost`` (and 127.0.0.1 unless ``ip=False``)."""
    return Cert(*self_signed_cert(folder, name, ips=("127.0.0.1",) if ip else ()))


@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    return make_cert(tmp_path, "server")


async def tls_server(cert: Cert) -> SignalingServer:
    config = SignalingConfig(port=0, certfile=str(cert.certfile), keyfile=str(cert.keyfile))
    server = SignalingServer(config)
    await server.start()
    return server


class Pair:
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def on_signal(self, peer: str, data: dict[str, Any]) -> None:
        await self.inbox.put((peer, data))


async def round_trip(a: SignalingClient, b: SignalingClient, pair: Pair, tag: str) -> None:
    await a.send_signal(b.peer_id, {"tag": tag})
    async with asyncio.timeout(WAIT):
        assert await pair.inbox.get() == (a.peer_id, {"tag": tag})


@pytest.fixture
async def cli_server(cert: Cert) -> AsyncIterator[str]:
    """``swarm-notebook signal --certfile --keyfile`` in its own process; yields its URL."""
    flags = ("--certfile", str(cert.certfile), "--keyfile", str(cert.keyfile))
    async with cli_signal_server(*flags) as (url, line):
        assert line.startswith("signaling server listening on wss://127.0.0.1:"), line
        yield url


async def test_cli_serves_wss_and_clients_that_trust_the_cert_join_and_relay(
    cli_server: str, cert: Cert, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = Pair()
    a = SignalingClient(cli_server, "lab", Identity.generate(), ca_file=str(cert.certfile))
    # The documented way for join() and workers: the environment variable.
    monkeypatch.setenv(environment.CA_FILE, str(cert.certfile))
    b = SignalingClient(cli_server, "lab", Identity.generate(), on_signal=pair.on_signal)
    try:
        await a.start(timeout=WAIT)
        await b.start(timeout=WAIT)
        await round_trip(a, b, pair, "over-tls")
    finally:
        await a.close()
        await b.close()
    # /stats is served over TLS as well; plain HTTP on that port gets nothing.
    context = ssl.create_default_context(cafile=str(cert.certfile))
    stats_url = cli_server.replace("wss://", "https://").replace("/ws", "/stats")
    async with aiohttp.ClientSession() as http:
        async with http.get(stats_url, ssl=context) as response:
            assert (await response.json())["joins_total"] == 2
        with pytest.raises(aiohttp.ClientError):
            async with http.get(stats_url.replace("https://", "http://")) as response:
                await response.read()


async def test_ssl_cert_file_is_honoured_too(cert: Cert, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert.certfile))
    server = await tls_server(cert)
    client = SignalingClient(server.url, "lab", Identity.generate())
    try:
        await client.start(timeout=WAIT)
        assert client.connected and server.url.startswith("wss://")
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize("trust", ["system", "another-cert", "name-mismatch"])
async def test_an_untrusted_certificate_is_a_clear_error_not_a_hang(
    trust: str, tmp_path: Path, cert: Cert, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(environment.CA_FILE, raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    served = make_cert(tmp_path, "no-ip", ip=False) if trust == "name-mismatch" else cert
    ca_file = {
        "system": None,
        "another-cert": str(make_cert(tmp_path, "other").certfile),
        "name-mismatch": str(served.certfile),  # trusted, but not issued for 127.0.0.1
    }[trust]
    server = await tls_server(served)
    client = SignalingClient(server.url, "lab", Identity.generate(), ca_file=ca_file)
    trusted = SignalingClient(server.url, "lab", Identity.generate(), ca_file=str(served.certfile))
    try:
        # Well within the timeout: the client gives up at once rather than retrying.
        with pytest.raises(SignalingTLSError) as refused:
            await client.start(timeout=60)
        assert refused.value.reason == "untrusted-certificate"
        assert client.stats()["connect_attempts"] == 1
        message = refused.value.message
        assert server.url in message and environment.CA_FILE in message
        if trust == "name-mismatch":
            assert "not valid for '127.0.0.1'" in message and "subject alternative" in message
        else:
            assert "self-signed" in message
        # The server shrugs off the failed handshake and serves a client that trusts it
        # (over 127.0.0.1 only if the certificate names that address).
        if trust != "name-mismatch":
            await trusted.start(timeout=WAIT)
            assert trusted.connected
    finally:
        await client.close()
        await trusted.close()
        await server.close()


async def test_wss_to_a_plain_server_says_the_server_does_not_speak_tls() -> None:
    server = SignalingServer(SignalingConfig(port=0))
    await server.start()
    url = server.url.replace("ws://", "wss://")
    client = SignalingClient(url, "lab", Identity.generate())
    try:
        with pytest.raises(SignalingTLSError) as refused:
            await client.start(timeout=60)
        assert refused.value.reason == "tls-failed" and "--certfile" in refused.value.message
    finally:
        await client.close()
        await server.close()


async def test_an_unreadable_ca_file_is_refused_before_connecting(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    client = SignalingClient(
        "wss://127.0.0.1:1/ws", "lab", Identity.generate(), ca_file=str(missing)
    )
    with pytest.raises(SignalingTLSError) as refused:
        await client.start(timeout=WAIT)
    assert refused.value.reason == "tls-failed" and str(missing) in refused.value.message


async def test_cli_refuses_a_certificate_it_cannot_load(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pem"
    bad.write_text("not a certificate")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarm_notebook.cli.main",
        "signal",
        "--port",
        "0",
        "--certfile",
        str(bad),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert "cannot load the TLS certificate" in stderr.decode() and str(bad) in stderr.decode()


@pytest.mark.timeout(180)
async def test_worker_and_notebook_delegate_through_a_wss_server(
    cli_server: str, cert: Cert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three processes: wss:// server, ``worker --ca-file``, and ``join(ca_file=...)``."""
    from swarm_notebook.client import join
    from tests.support.procs import WorkerProcess

    monkeypatch.delenv(environment.CA_FILE, raising=False)
    worker = await WorkerProcess.start(
        cli_server,
        "tls",
        str(tmp_path / "worker"),
        "--caps",
        "python-execution",
        "--ca-file",
        str(cert.certfile),
    )
    coordinator = None
    try:
        coordinator = await join(
            "tls", signaling=cli_server, profile=tmp_path / "me", ca_file=cert.certfile
        )
        c = coordinator

        def linked() -> bool:
            peers = c.get_stats()["peers"]
            return any(p["id"] == worker.peer_id and p["state"] == "connected" for p in peers)

        async with asyncio.timeout(60):
            while not linked():  # noqa: ASYNC110 - the link state has no event to wait on
                await asyncio.sleep(0.05)
        result = await coordinator.delegate_task(
            "python-computation", {"code": "6 * 7"}, peer=worker.peer_id, timeout=60
        )
        assert result["success"] and result["value"] == 42 and result["peer"] == worker.peer_id
    finally:
        if coordinator is not None:
            await coordinator.leave()
        code = await worker.stop()
    assert code == 0, "".join(worker.stderr_lines[-20:])


async def test_a_worker_that_does_not_trust_the_certificate_exits_with_the_fix(
    cli_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(environment.CA_FILE, raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarm_notebook.cli.main",
        "worker",
        "--signaling",
        cli_server,
        "--room",
        "tls",
        "--profile",
        str(tmp_path / "worker"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 1 and b"READY" not in stdout
    last = stderr.decode().strip().splitlines()[-1]
    assert last.startswith("swarm-notebook worker: untrusted-certificate: "), last
    assert environment.CA_FILE in last and "Traceback" not in stderr.decode()
