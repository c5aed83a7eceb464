"""Bounds on what a peer can make us hold, and refusals that reach the sender at once.

Real aiortc peers in separate processes (``tests/support/mesh_peer.py``) through a real
signaling server on loopback.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.protocol.framing import frame_message
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import PeerProcess
from tests.test_mesh import start_peers, stop_all, wait_connected

pytestmark = pytest.mark.timeout(240)


def first_chunks(n: int, base_id: int) -> list[str]:
    """Opening chunks of ``n`` transfers that are never finished, as hex for ``raw``."""
    return [next(iter(frame_message(os.urandom(200_000), base_id + i))).hex() for i in range(n)]


async def stats_until(peer: PeerProcess, done: Any, what: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = await peer.call("stats")
        if done(stats):
            return stats
        assert time.monotonic() < deadline, f"{what}: {stats}"
        await asyncio.sleep(0.1)


async def test_chunks_on_an_unauthenticated_link_are_refused_and_held_nowhere(
    server: SignalingServer, tmp_path: Path
) -> None:
    honest = await start_peers(server.url, tmp_path, 2)
    h, c = honest
    holder = (await start_peers(server.url, tmp_path / "x", 1, "--hold-auth"))[0]
    h_log = await PeerProcess.start(
        "mesh_peer.py",
        "--signaling",
        server.url,
        "--profile",
        str(tmp_path / "hl"),
        name="logged",
        env={"MESH_PEER_LOG": "INFO"},
    )
    h_log.peer_id = (await h_log.wait_for(lambda e: e.get("event") == "ready", 30))["peer_id"]  # type: ignore[attr-defined]
    honest.append(h_log)
    try:
        await wait_connected(h, 2)
        for target in (h, h_log):
            await holder.call(
                "raw", peer=target.peer_id, frames=first_chunks(30, 1000), before_auth=True
            )
            stats = await stats_until(
                target,
                lambda s: s["stats"]["rejections"].get("unauthenticated", 0) >= 30,
                "chunks before authentication refused",
            )
            assert stats["stats"]["reassembly_pending_bytes"] == 0
        assert holder.peer_id not in (await h.call("peers"))["connected"]
        # The honest peer is served all along.
        assert (await c.call("request", peer=h.peer_id, size=300_000))["identical"]
    finally:
        await stop_all([*honest, holder])
    # Thirty refusals, one log line for that peer and reason (stderr is complete now).
    logged = [
        line for line in h_log.stderr_lines if "rejected" in line and "unauthenticated" in line
    ]
    assert len(logged) == 1, logged


async def test_refused_request_and_refused_reply_fail_at_once_with_the_reason(
    server: SignalingServer, tmp_path: Path
) -> None:
    a = (await start_peers(server.url, tmp_path / "a", 1))[0]
    b = (await start_peers(server.url, tmp_path / "b", 1, "--max-message-kb", "256"))[0]
    try:
        await wait_connected(a, 1)
        await wait_connected(b, 1)
        # Too large for b: a's request fails with b's reason, not after its 120 s timeout.
        big = await a.call(
            "ask", peer=b.peer_id, type="echo", size=1_000_000, wait=120, timeout=150
        )
        assert (big["ok"], big["raised"], big["reason"]) == (False, "RemoteError", "oversized")
        print(f"refused request failed after {big['seconds']:.3f} s")
        # b asks for something whose answer is too large for b: a is told, b hears at once.
        reply = await b.call(
            "ask", peer=a.peer_id, type="blob", body=1_000_000, wait=120, timeout=150
        )
        assert (reply["ok"], reply["raised"], reply["reason"]) == (
            False,
            "RemoteError",
            "oversized",
        )
        print(f"refused reply failed after {reply['seconds']:.3f} s")
        # Honest traffic of a size b accepts flows both ways.
        assert (await a.call("ask", peer=b.peer_id, type="echo", size=100_000, wait=30))["ok"]
        assert (await b.call("ask", peer=a.peer_id, type="blob", body=100_000, wait=30))["ok"]
        b_stats, a_stats = await b.call("stats"), await a.call("stats")
        # One refusal per message, not one per chunk still on its way.
        assert b_stats["stats"]["rejections"].get("oversized") == 2, b_stats
        assert a_stats["refused_by_peers"] == {"oversized": 2}, a_stats
    finally:
        await stop_all([a, b])


async def test_one_reassembly_budget_across_links_and_greedy_links_pay(
    server: SignalingServer, tmp_path: Path
) -> None:
    r = (await start_peers(server.url, tmp_path / "r", 1, "--reassembly-total-kb", "1024"))[0]
    others = await start_peers(server.url, tmp_path / "o", 3)
    x1, x2, honest = others
    try:
        await wait_connected(r, 3)
        for n, x in enumerate((x1, x2)):
            await x.call("raw", peer=r.peer_id, frames=first_chunks(30, 10_000 * (n + 1)))
        stats = await stats_until(
            r,
            lambda s: s["stats"]["rejections"].get("reassembly-full", 0) > 0,
            "pool full",
        )
        # Per link the flood is 2 x 1.9 MB; all links together hold at most 1 MB.
        assert 0 < stats["stats"]["reassembly_pending_bytes"] <= 1024 * 1024
        # The honest peer's 300 KB request is reassembled: room comes from a greedy link.
        assert (await honest.call("request", peer=r.peer_id, size=300_000))["identical"]
        after = (await r.call("stats"))["stats"]
        assert after["reassembly_pending_bytes"] <= 1024 * 1024
        assert len((await r.call("peers"))["connected"]) == 3
    finally:
        await stop_all([r, *others])
