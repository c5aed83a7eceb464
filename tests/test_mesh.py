"""aiortc peers in separate processes through a real signaling server on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from swarm_notebook.identity import Identity
from swarm_notebook.protocol.envelope import PROTOCOL_VERSION, Envelope, encode_envelope
from swarm_notebook.protocol.framing import frame_message
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingConfig, SignalingServer
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig
from tests.support.procs import PeerProcess, child_processes

pytestmark = pytest.mark.timeout(240)


async def start_peers(url: str, tmp: Path, n: int, *extra: str) -> list[PeerProcess]:
    peers = await asyncio.gather(
        *(
            PeerProcess.start(
                "mesh_peer.py",
                "--signaling",
                url,
                "--profile",
                str(tmp / f"p{i}"),
                *extra,
                name=f"peer{i}",
            )
            for i in range(n)
        )
    )
    for p in peers:
        ready = await p.wait_for(lambda e: e.get("event") == "ready", 30)
        p.peer_id = ready["peer_id"]  # type: ignore[attr-defined]
    return list(peers)


async def wait_connected(peer: PeerProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # Mark before asking: a peer_up printed while the reply travels is not missed.
        mark = len(peer.events)
        reply = await peer.call("peers")
        if len(reply["connected"]) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.name} has {reply} after {timeout}s")
        await peer.wait_for(
            lambda e: e.get("event") == "peer_up", deadline - time.monotonic(), start=mark
        )


async def stop_all(peers: list[PeerProcess]) -> None:
    codes = await asyncio.gather(*(p.stop() for p in peers))
    for p, code in zip(peers, codes, strict=True):
        if code != -9:
            assert code == 0, f"{p.name} exited {code}: {''.join(p.stderr_lines[-20:])}"
            assert p.problems() == [], p.problems()
            closed = next(e for e in p.events if e.get("event") == "closed")
            # Nothing left behind: no pending task on the network loop, no socket, no thread.
            assert closed["tasks"] == 0 and closed["sockets"] == 0, closed
            assert closed["threads"] == [], closed
    assert child_processes() == []


async def test_three_peers_mesh_bulk_signaling_restart_and_kill(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers = await start_peers(server.url, tmp_path, 3)
    a, b, c = peers
    try:
        for p in peers:
            await wait_connected(p, 2)

        # A 10 MB message is chunked, reassembled and comes back byte-identical.
        big = await a.call("request", peer=b.peer_id, size=10 * 1024 * 1024, timeout=90)
        assert big["identical"] and big["bytes"] == 10 * 1024 * 1024

        # The signaling server goes away: links stay up and keep carrying traffic.
        port = server.port
        events_before = [len(p.events) for p in peers]
        await server.close()
        small = await a.call("request", peer=c.peer_id, size=1000)
        assert small["identical"]
        restarted = SignalingServer(SignalingConfig(port=port))
        await restarted.start()
        try:
            deadline = time.monotonic() + 30
            while restarted.stats()["peers"] < 3:
                assert time.monotonic() < deadline, restarted.stats()
                await asyncio.sleep(0.1)
            for p, before in zip(peers, events_before, strict=True):
                downs = [e for e in p.events[before:] if e.get("event") == "peer_down"]
                assert downs == [], f"{p.name} lost links during the outage: {downs}"
                assert len((await p.call("peers"))["connected"]) == 2

            # kill -9 of one peer is noticed by the others within 5 s.
            marks = [len(a.events), len(b.events)]
            killed_at = time.time()
            c.kill()
            for p, mark in zip((a, b), marks, strict=True):
                down = await p.wait_for(
                    lambda e: e.get("event") == "peer_down" and e.get("peer") == c.peer_id,
                    10,
                    start=mark,
                )
                assert down["t"] - killed_at < 5.0, f"noticed after {down['t'] - killed_at:.2f}s"
            assert (await a.call("peers"))["connected"] == [b.peer_id]
        finally:
            await stop_all(peers)
            await restarted.close()
    finally:
        for p in peers:
            p.kill()


async def test_simultaneous_join_connects_once_without_glare(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers = await start_peers(server.url, tmp_path, 2)
    try:
        for p in peers:
            await wait_connected(p, 1)
        for p in peers:
            stats = (await p.call("stats"))["stats"]
            assert stats["rejections"].get("unexpected-offer", 0) == 0
            assert stats["links_lost"] == 0
            ups = [e for e in p.events if e.get("event") == "peer_up"]
            assert len(ups) == 1
        dials = [(await p.call("stats"))["stats"]["dials"] for p in peers]
        assert sorted(dials) == [0, 1]  # exactly one side offered, exactly once
    finally:
        await stop_all(peers)


async def test_garbage_over_the_data_channel_is_counted_and_peer_keeps_serving(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers = await start_peers(server.url, tmp_path, 3)
    a, b, c = peers
    try:
        for p in peers:
            await wait_connected(p, 2)
        wrong_schema = b"\x00" + msgspec.msgpack.encode({"not": "an envelope"})
        bad_version = b"\x00" + encode_envelope(Envelope(v=42, type="echo", id="x"))
        truncated_chunk = bytes([1]) + b"\x00" * 6
        garbage = b"\x00\xc1\xc1\xc1 garbage"
        unknown_kind = b"\x09hello"
        oversized_announce = next(iter(frame_message(b"x" * 200_000, 77)))[:17] + b"x" * 100
        frames = [wrong_schema, bad_version, truncated_chunk, garbage, unknown_kind]
        await a.call("raw", peer=b.peer_id, frames=[f.hex() for f in frames], text="a text frame")
        # An application message type nobody handles: refused with a reason, not a crash.
        unknown = b"\x00" + encode_envelope(
            Envelope(v=PROTOCOL_VERSION, type="no-such", id="1", ask=True)
        )
        await a.call("raw", peer=b.peer_id, frames=[unknown.hex(), oversized_announce.hex()])
        deadline = time.monotonic() + 10
        expected = {
            "wrong-schema",
            "malformed",
            "bad-version",
            "truncated-chunk",
            "bad-frame-kind",
            "text-frame",
        }
        while True:
            stats = await b.call("stats")
            seen = set(stats["stats"]["rejections"]) | set(stats["endpoint_rejections"])
            if expected <= seen | {"wrong-schema"} and "unknown-type" in seen:
                break
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        # b is still up and serves both peers.
        for sender in (a, c):
            assert (await sender.call("request", peer=b.peer_id, size=100_000))["identical"]
        assert len((await b.call("peers"))["connected"]) == 2
    finally:
        await stop_all(peers)


async def test_dropped_link_is_redialled_while_both_stay_in_the_room(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers = await start_peers(server.url, tmp_path, 2)
    a, b = peers
    try:
        await wait_connected(a, 1)
        await wait_connected(b, 1)
        marks = [len(a.events), len(b.events)]
        await a.call("drop_link", peer=b.peer_id)
        for p, other, mark in ((a, b, marks[0]), (b, a, marks[1])):
            await p.wait_for(
                lambda e, o=other: e.get("event") == "peer_down" and e.get("peer") == o.peer_id,
                10,
                start=mark,
            )
            await p.wait_for(
                lambda e, o=other: e.get("event") == "peer_up" and e.get("peer") == o.peer_id,
                20,
                start=mark,
            )
        assert (await a.call("request", peer=b.peer_id, size=200_000))["identical"]
        assert (await b.call("request", peer=a.peer_id, size=200_000))["identical"]
    finally:
        await stop_all(peers)


async def test_peer_failing_link_proof_is_refused(server: SignalingServer, tmp_path: Path) -> None:
    honest = await start_peers(server.url, tmp_path, 1)
    impostor = await start_peers(server.url, tmp_path / "bad", 1, "--bad-link-key")
    try:
        deadline = time.monotonic() + 15
        while True:
            stats = (await honest[0].call("stats"))["stats"]
            if stats["rejections"].get("auth-failed", 0) >= 1:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.2)
        assert (await honest[0].call("peers"))["connected"] == []
        assert not [e for e in honest[0].events if e.get("event") == "peer_up"]
    finally:
        await stop_all(honest + impostor)


async def test_network_keeps_serving_while_the_main_thread_blocks(
    server: SignalingServer, tmp_path: Path
) -> None:
    peers = await start_peers(server.url, tmp_path, 2)
    a, b = peers
    try:
        await wait_connected(a, 1)
        await wait_connected(b, 1)
        mark = len(a.events)
        blocker = asyncio.create_task(b.call("block", seconds=30, timeout=60))
        answered = 0
        started = time.monotonic()
        while not blocker.done():
            assert (await a.call("request", peer=b.peer_id, size=1000))["identical"]
            answered += 1
            await asyncio.sleep(0.5)
        await blocker
        assert time.monotonic() - started >= 29
        assert answered >= 40
        assert not [e for e in a.events[mark:] if e.get("event") == "peer_down"]
    finally:
        await stop_all(peers)


async def test_dial_to_a_departed_peer_fails_at_once_with_unknown_peer(
    server: SignalingServer, tmp_path: Path
) -> None:
    """The server's ``unknown-peer`` answer ends a dial at once.

    Our membership view keeps a departed peer for ``departure_grace`` (60 s here) and the
    connect timeout is longer still, so without the server's answer the redial to the
    killed peer would sit in CONNECTING for a minute.
    """
    (departing,) = await start_peers(server.url, tmp_path, 1)
    peer_id: str = departing.peer_id  # type: ignore[attr-defined]
    identity = Identity.generate()
    while identity.peer_id > peer_id:  # we must be the offerer, the side that redials
        identity = Identity.generate()
    config = MeshConfig(
        heartbeat_interval_s=0.3, peer_timeout_s=1.5, connect_timeout_s=120, redial_initial_s=0.1
    )
    local = mesh_transport(identity, server.url, "test", config=config, departure_grace=60)
    up, down, dial_failed = asyncio.Event(), asyncio.Event(), asyncio.Future[str]()
    local.callbacks.on_peer_up = lambda peer: up.set()
    local.callbacks.on_peer_down = lambda peer, reason: down.set()

    def failed(peer: str, reason: str) -> None:
        if peer == peer_id and not dial_failed.done():
            dial_failed.set_result(reason)

    local.callbacks.on_dial_failed = failed
    try:
        await local.start()
        await asyncio.wait_for(up.wait(), 30)
        departing.kill()
        await asyncio.wait_for(down.wait(), 10)
        assert peer_id in local.room_members(), "still a member during the grace period"
        reason = await asyncio.wait_for(dial_failed, 15)
        assert reason.startswith(Reason.UNKNOWN_PEER) and peer_id[:16] in reason, reason
        assert local.stats()["dials_failed"] >= 1
    finally:
        await local.close()
        await departing.stop()
