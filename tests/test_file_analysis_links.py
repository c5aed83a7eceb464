"""Finding 10 with real processes: a hard link planted in a worker's workspace cannot be
used to read (hash) a file outside it, and the worker keeps serving honest requests."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from swarm_notebook.client import Coordinator, join
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import WorkerProcess

pytestmark = pytest.mark.timeout(180)


async def file_peer(c: Coordinator) -> None:
    deadline = time.monotonic() + 60
    while not any(
        p["state"] == "connected" and "file-management" in p["capabilities"]
        for p in c.get_stats()["peers"]
    ):
        assert time.monotonic() < deadline, c.get_stats()["peers"]
        await asyncio.sleep(0.05)


async def test_hard_link_out_of_the_workspace_is_refused(
    server: SignalingServer, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "data.csv").write_text("a,b\n1,2\n")
    secret = tmp_path / "owner-secret.txt"
    secret.write_text("the owner's secret")
    os.link(secret, workspace / "report.csv")  # what a colleague's task could plant
    worker = await WorkerProcess.start(
        server.url,
        "links",
        str(tmp_path / "w"),
        "--caps",
        "file-management",
        "--workspace",
        str(workspace),
        name="w",
    )
    c = await join("links", signaling=server.url, profile=tmp_path / "me")
    try:
        await file_peer(c)
        bad = await c.delegate_task("file-analysis", {"path": "report.csv"})
        assert not bad["success"] and bad["error_type"] == "path-outside-workspace", bad
        assert "analysis" not in bad
        ok = await c.delegate_task("file-analysis", {"path": "data.csv"})
        assert ok["success"] and ok["analysis"]["lines"] == 3
    finally:
        await c.leave()
        assert await worker.stop() == 0, "".join(worker.stderr_lines[-20:])
