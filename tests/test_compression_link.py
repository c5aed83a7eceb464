"""A compressible frame crosses a real aiortc link compressed, both ways, and arrives equal."""

from __future__ import annotations

from pathlib import Path

import pytest

import swarm_notebook.environment as environment
from swarm_notebook.bench.data_frames import frame_bytes, realistic50
from swarm_notebook.client import join
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.transport.backends.select import backend_name
from tests.support.procs import child_processes, start_workers
from tests.test_delegation import PY_CAPS, capable_peers, stop_workers

pytestmark = pytest.mark.timeout(180)


def _link_bytes(stats: dict[str, object], peer: str) -> tuple[int, int]:
    link = next(p for p in stats["peers"] if p["id"] == peer)  # type: ignore[attr-defined]
    return int(link["bytes_out"]), int(link["bytes_in"])


async def test_a_compressible_frame_travels_compressed_and_arrives_equal(
    server: SignalingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compression is for links slower than the codec: a direct TCP link on loopback may
    # rightly decide against it, so this runs on aiortc's (the workers inherit it).
    if backend_name() == "direct":
        monkeypatch.setenv(environment.TRANSPORT_BACKEND, "aiortc")
    workers = await start_workers(server.url, "zip", tmp_path, 1, *PY_CAPS)
    c = await join("zip", signaling=server.url, profile=tmp_path / "me")
    try:
        await capable_peers(c, 1)
        df = realistic50(200_000)  # categoricals, small ints, rounded floats, timestamps
        size = frame_bytes(df)
        assert size > 8_000_000
        peer = workers[0].peer_id
        out0, in0 = _link_bytes(c.get_stats(), peer)
        r = await c.delegate_task("python-computation", {"code": "df", "inputs": {"df": df}})
        assert r["success"], r
        assert r["value"].equals(df)
        out1, in1 = _link_bytes(c.get_stats(), peer)
        # Both the input on the way out and the value on the way back are compressed.
        assert out1 - out0 < 0.75 * size, (out1 - out0, size)
        assert in1 - in0 < 0.75 * size, (in1 - in0, size)
    finally:
        await c.leave()
        await stop_workers(workers)
    assert child_processes() == []
