"""The direct backend: TLS over TCP between peers that reach each other, WebRTC otherwise.

Peers run in separate processes (``support/mesh_peer.py``) through a real signaling
server. The faults (a listener serving the wrong certificate, a wrong token, strangers
on the listener) are injected in those processes (``--direct-fault``); what each end
counted is read from its mesh's stats. A few properties of one backend (relay-only, the
listener's pre-auth caps, the aiortc attribute we read) are checked in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.transport.backends import direct_sdp, direct_tls
from swarm_notebook.transport.backends.base import BackendConfig, BackendCounters
from swarm_notebook.transport.backends.direct_backend import (
    ATTEMPTS,
    LINKS,
    OFFERED,
    DirectBackend,
    fallback,
    refused,
)
from swarm_notebook.transport.backends.direct_channel import MAX_FRAME
from swarm_notebook.transport.backends.direct_handshake import MAX_PENDING, Listener
from swarm_notebook.transport.backends.select import BACKENDS, backend_name
from swarm_notebook.transport.mesh import MeshConfig
from tests.support.native_python import native_python
from tests.support.procs import REPO, PeerProcess
from tests.test_mesh import start_peers, stop_all, wait_connected

pytestmark = pytest.mark.timeout(180)

MB = 1024 * 1024


async def link_of(peer: PeerProcess, other: PeerProcess) -> dict[str, Any]:
    links = (await peer.call("links"))["links"]
    (link,) = [x for x in links if x["peer_id"] == other.peer_id]  # type: ignore[attr-defined]
    return dict(link)


async def counters(peer: PeerProcess) -> dict[str, int]:
    return dict((await peer.call("stats"))["stats"]["backend_counters"])


async def offerer_answerer(a: PeerProcess, b: PeerProcess) -> tuple[PeerProcess, PeerProcess]:
    """The smaller id offers (the mesh's rule)."""
    return (a, b) if a.peer_id < b.peer_id else (b, a)  # type: ignore[attr-defined]


async def linked_pair(
    server: SignalingServer, tmp: Path, *extra: str
) -> tuple[list[PeerProcess], PeerProcess, PeerProcess]:
    peers = await start_peers(server.url, tmp, 2, "--backend", "direct", *extra)
    for p in peers:
        await wait_connected(p, 1)
    offerer, answerer = await offerer_answerer(*peers)
    return peers, offerer, answerer


def test_direct_is_registered_and_opt_in() -> None:
    assert "direct" in BACKENDS
    assert backend_name(environ={}) == "aiortc"
    assert backend_name(environ={"SWARM_NOTEBOOK_TRANSPORT_BACKEND": "direct"}) == "direct"
    assert MeshConfig(backend="direct").backend_config().direct_connect_timeout_s <= 1.5


async def test_two_direct_peers_link_over_tcp_and_carry_megabytes_both_ways(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers, offerer, answerer = await linked_pair(server, tmp_path)
    try:
        for me, other in ((offerer, answerer), (answerer, offerer)):
            link, seen = await link_of(me, other), await counters(me)
            assert link["route"] == "direct" and link["local_candidate"] == "direct", (
                seen,
                me.stderr_lines[-12:],
            )
            assert link["backend"] == "direct"
        for me, other in ((offerer, answerer), (answerer, offerer)):
            reply = await me.call("request", peer=other.peer_id, size=12 * MB, timeout=90)
            assert reply["identical"] and reply["bytes"] == 12 * MB
        seen = await counters(offerer), await counters(answerer)
        assert seen[0] == {OFFERED: 1, LINKS: 1}, seen
        assert seen[1] == {ATTEMPTS: 1, LINKS: 1}, seen
        for p in peers:
            assert (await p.call("stats"))["stats"]["rejections"] == {}
    finally:
        await stop_all(peers)  # no pending task, no socket, no thread left in either


async def test_direct_and_aiortc_peers_in_one_room_link_over_webrtc(
    server: SignalingServer, tmp_path: Path
) -> None:
    (direct,) = await start_peers(server.url, tmp_path / "d", 1, "--backend", "direct")
    (plain,) = await start_peers(server.url, tmp_path / "a", 1, "--backend", "aiortc")
    peers = [direct, plain]
    try:
        for p in peers:
            await wait_connected(p, 1)
        link = await link_of(direct, plain)
        assert link["route"] == "host" and link["backend"] == "aiortc", link
        assert (await direct.call("request", peer=plain.peer_id, size=2 * MB))["identical"]
        assert (await plain.call("request", peer=direct.peer_id, size=2 * MB))["identical"]
        seen = await counters(direct)
        # Offering, the direct peer's answer came back without -ok (aiortc ignored the
        # line); answering, the offer had no line at all.
        expected = (
            fallback(Reason.DIRECT_DECLINED)
            if direct.peer_id < plain.peer_id  # type: ignore[attr-defined]
            else fallback(Reason.DIRECT_NOT_OFFERED)
        )
        assert seen.get(expected) == 1 and LINKS not in seen, seen
        assert await counters(plain) == {}
    finally:
        await stop_all(peers)


@pytest.mark.parametrize(
    ("fault", "offerer_counts", "answerer_counts"),
    [
        ("wrong-cert", {}, {fallback(Reason.FINGERPRINT_MISMATCH): 1}),
        (
            "wrong-token",
            {refused(Reason.BAD_TOKEN): 1},
            {fallback(Reason.DIRECT_REFUSED): 1},
        ),
    ],
)
async def test_an_unverified_stream_is_refused_and_the_link_falls_back(
    server: SignalingServer,
    tmp_path: Path,
    fault: str,
    offerer_counts: dict[str, int],
    answerer_counts: dict[str, int],
) -> None:
    peers, offerer, answerer = await linked_pair(server, tmp_path, "--direct-fault", fault)
    try:
        for me, other in ((offerer, answerer), (answerer, offerer)):
            assert (await link_of(me, other))["route"] == "host"
            assert (await me.call("request", peer=other.peer_id, size=MB))["identical"]
        seen_offerer, seen_answerer = await counters(offerer), await counters(answerer)
        for name, count in offerer_counts.items():
            assert seen_offerer.get(name) == count, seen_offerer
        for name, count in answerer_counts.items():
            assert seen_answerer.get(name) == count, seen_answerer
        assert LINKS not in seen_offerer and LINKS not in seen_answerer
        assert seen_offerer.get(fallback(Reason.DIRECT_DECLINED)) == 1, seen_offerer
    finally:
        await stop_all(peers)


async def test_strangers_on_the_listener_are_dropped_and_the_honest_link_goes_direct(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers, offerer, answerer = await linked_pair(server, tmp_path, "--direct-fault", "stranger")
    try:
        seen = await counters(offerer)
        # Bytes that are not TLS fail the handshake; a TLS stranger's token is wrong.
        assert seen.get(refused(Reason.TLS_FAILED)) == 1, seen
        assert seen.get(refused(Reason.BAD_TOKEN)) == 1, seen
        assert seen.get(LINKS) == 1, seen
        assert (await link_of(answerer, offerer))["route"] == "direct"
        assert (await answerer.call("request", peer=offerer.peer_id, size=3 * MB))["identical"]
    finally:
        await stop_all(peers)


async def test_an_oversized_frame_or_a_killed_stream_drops_the_link_and_it_comes_back(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers, offerer, answerer = await linked_pair(server, tmp_path)
    try:
        for cmd, sender, receiver in (
            ("oversize", offerer, answerer),
            ("kill_stream", answerer, offerer),
        ):
            marks = [len(p.events) for p in peers]
            await sender.call(cmd, peer=receiver.peer_id)
            for p, mark in zip(peers, marks, strict=True):
                other = answerer if p is offerer else offerer
                for event in ("peer_down", "peer_up"):
                    await p.wait_for(
                        lambda e, o=other, ev=event: (
                            e.get("event") == ev and e.get("peer") == o.peer_id
                        ),
                        20,
                        start=mark,
                    )
            await wait_connected(sender, 1)
            assert (await link_of(sender, receiver))["route"] == "direct"
            assert (await sender.call("request", peer=receiver.peer_id, size=MB))["identical"]
        seen = await counters(answerer)
        assert seen.get(refused(Reason.FRAME_TOO_LARGE)) == 1, seen
        assert seen.get(LINKS) == 3, seen  # the first link and both re-dials
    finally:
        await stop_all(peers)


# -- one backend, in this process -----------------------------------------------------------


async def test_aiortc_still_keeps_its_dtls_certificate_where_we_read_it() -> None:
    """Fails when aiortc moves the private attribute ``direct_tls.dtls_certificate`` reads."""
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("swarm")
        await pc.setLocalDescription(await pc.createOffer())
        cert, _ = direct_tls.dtls_certificate(pc)
        assert direct_tls.certificate_fingerprint(cert) == direct_sdp.sha256_fingerprint(
            pc.localDescription.sdp
        )
    finally:
        await pc.close()


async def test_aiortc_answers_an_offer_that_carries_the_direct_line() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    try:
        offerer.createDataChannel("swarm")
        await offerer.setLocalDescription(await offerer.createOffer())
        line = direct_sdp.offer_line("127.0.0.1", 9, "ab" * 16)
        sdp = direct_sdp.add_session_line(offerer.localDescription.sdp, line)
        assert direct_sdp.parse_offer(sdp) == direct_sdp.DirectOffer("127.0.0.1", 9, "ab" * 16)
        from aiortc import RTCSessionDescription

        await answerer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        ok = direct_sdp.add_session_line(answerer.localDescription.sdp, direct_sdp.OK_ATTRIBUTE)
        await offerer.setRemoteDescription(RTCSessionDescription(sdp=ok, type="answer"))
        assert direct_sdp.accepted(ok)
    finally:
        await offerer.close()
        await answerer.close()


async def test_relay_only_never_listens_nor_dials() -> None:
    counted = BackendCounters()
    relay = BackendConfig(relay_only=True, host_addresses=["127.0.0.1"], counters=counted)
    offerer = DirectBackend(relay)
    answerer = DirectBackend(relay)
    dialled = asyncio.Event()
    server = await asyncio.start_server(lambda r, w: dialled.set(), "127.0.0.1", 0)
    try:
        offerer.create_channel("swarm")
        offer = await offerer.create_offer()
        assert "x-swarm-direct" not in offer and not offerer.listening
        port = server.sockets[0].getsockname()[1]
        lure = direct_sdp.add_session_line(
            offer, direct_sdp.offer_line("127.0.0.1", port, "cd" * 16)
        )
        await answerer.set_remote_description(lure, "offer")
        answer = await answerer.create_answer()
        assert not direct_sdp.accepted(answer)
        assert not dialled.is_set() and counted.by_name == {}
    finally:
        server.close()
        await offerer.close()
        await answerer.close()


async def test_listener_caps_what_an_unauthenticated_connection_may_do() -> None:
    pc = RTCPeerConnection()
    reasons: list[Reason] = []
    silent_dropped = asyncio.Event()

    def count(reason: Reason) -> None:
        reasons.append(reason)
        if reasons.count(Reason.TLS_FAILED) == MAX_PENDING:
            silent_dropped.set()

    try:
        pair = direct_tls.dtls_certificate(pc)
        listener = Listener(direct_tls.server_context(pair), "ef" * 16, 5.0, count)
        port = await listener.start("127.0.0.1")
        # More silent connections than may wait: the one over the cap is dropped at once.
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_PENDING)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionError:
            pass
        writer.close()
        assert reasons == [Reason.TOO_MANY_PENDING]
        for _, w in silent:
            w.close()
        # Each silent one, hung up, ends its handshake: the listener has room again.
        await asyncio.wait_for(silent_dropped.wait(), 5)
        # A token frame longer than a token is refused before it is read.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=direct_tls.client_context(), server_hostname=""
        )
        writer.write((65).to_bytes(4, "big") + b"x" * 65)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()
        assert Reason.FRAME_TOO_LARGE in reasons
        assert not listener.accepted_event.is_set()
        await listener.close()
        assert not listener.listening
    finally:
        await pc.close()
    assert MAX_FRAME == MB


def test_libdatachannel_links_with_the_direct_lines_in_its_sdp() -> None:
    python = native_python()
    if python is None:
        pytest.skip("no Python >= 3.13 with libdatachannel-py here (`./dev test` makes .venv313)")
    run = subprocess.run(
        [python, os.path.join(REPO, "tests", "support", "native_direct_sdp.py")],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"linked": True, "ok_line": True}
