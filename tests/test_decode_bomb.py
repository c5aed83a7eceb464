"""Finding 5: a worker answering with a decompression bomb cannot blow up the notebook.

The hostile worker is a real process on the mesh; this process is the notebook. Its eight
outputs are a few kilobytes of zstd-compressed Arrow that declare ~1.8 GB together.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import ValueCodecError
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import PeerProcess, WorkerProcess

pytestmark = pytest.mark.timeout(240)

MB = 1024 * 1024


async def capable(c: Coordinator, peers: set[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        up = {
            p["id"]
            for p in c.get_stats()["peers"]
            if p["state"] == "connected" and "python-execution" in p["capabilities"]
        }
        if peers <= up:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"peers {peers} not connected: {up}")
        await asyncio.sleep(0.05)


async def test_eight_compressed_outputs_are_refused_before_they_expand(
    server: SignalingServer, tmp_path: Path
) -> None:
    bomb = await PeerProcess.start(
        "bomb_worker.py",
        "--signaling",
        server.url,
        "--room",
        "bomb",
        "--profile",
        str(tmp_path / "bomb"),
        name="bomb",
    )
    honest = await WorkerProcess.start(
        server.url, "bomb", str(tmp_path / "w"), "--caps", "python-execution", name="honest"
    )
    c = await join("bomb", signaling=server.url, profile=tmp_path / "me")
    try:
        ready: dict[str, Any] = await bomb.wait_for(lambda e: e.get("event") == "ready", 90)
        assert ready["wire_bytes"] < 100_000  # the whole bomb is tiny on the wire
        await capable(c, {ready["peer_id"], honest.peer_id})
        me = psutil.Process()
        before = me.memory_info().rss
        for _ in range(3):
            with pytest.raises(ValueCodecError) as err:
                await c.delegate_task("python-computation", {"code": "1"}, peer=ready["peer_id"])
            assert err.value.reason == "too-large"
        grown = me.memory_info().rss - before
        print(f"bomb: {ready['wire_bytes']} bytes on the wire, RSS grew {grown / MB:.1f} MB")
        # Unbounded, this was +1.7 GB; declared sizes are refused before anything expands.
        assert grown < 64 * MB, f"RSS grew by {grown / MB:.0f} MB"
        assert c.get_stats()["rejections"].get("too-large", 0) >= 3
        # The honest worker keeps being served, right after.
        ok = await c.delegate_task("python-computation", {"code": "6 * 7"}, peer=honest.peer_id)
        assert ok["success"] and ok["value"] == 42
    finally:
        await c.leave()
        await bomb.stop()
        code = await honest.stop()
        assert code == 0, "".join(honest.stderr_lines[-20:])
