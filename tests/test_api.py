"""The public facade on its own: a lone peer joined through a real signaling server."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import pytest

import swarm_notebook
from swarm_notebook.cli.main import build_parser as cli_parser
from swarm_notebook.coordinator.config import DEFAULT_ROOM
from swarm_notebook.notebook.magics import build_parser
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import WorkerProcess


async def test_lone_peer_status_sharing_rules_and_fallback(
    server: SignalingServer, tmp_path: Path
) -> None:
    c = await swarm_notebook.join("solo", signaling=server.url, profile=tmp_path / "me")
    try:
        assert c.room == "solo" and await c.settle(1) == []  # nobody else in the room
        with pytest.raises(swarm_notebook.WaitTimeout) as waited:
            await swarm_notebook.wait_for_peers(c, 1, timeout=0.3)
        assert isinstance(waited.value, TimeoutError) and "0 of 1 peers" in waited.value.message
        with pytest.raises(swarm_notebook.WaitTimeout):
            await c.wait_for_reflection(timeout=0.3)
        # No IPython session here: use() says what is missing.
        with pytest.raises(swarm_notebook.UsageError) as unused:
            swarm_notebook.use(c)
        assert unused.value.reason == swarm_notebook.Reason.NOT_LOADED
        status = c.get_status()
        assert status["state"] == "idle" and status["primary_metric"] == "0 peers"
        assert status["message"] == "No peers"

        lesson = {"category": "pandas", "description": "use categoricals", "tags": ["memory"]}
        with pytest.warns(UserWarning, match="only reflections with outcome 'successful'"):
            assert await c.share_success_pattern({**lesson, "outcome": "success"}) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert await c.share_success_pattern({**lesson, "outcome": "successful"}) == 0
        found = await c.query_knowledge("categoricals")
        # Both were stored locally (they differ by outcome); only one was ever shareable.
        assert sorted(r["outcome"] for r in found["reflections"]) == ["success", "successful"]

        # No peer to ask: the blueprint's documented fallback, with its reason.
        result = await c.request_modification_consensus(
            {"file_path": "notes.md", "code": "x", "operation": "MODIFY", "reason": "typo"}
        )
        assert result["consensus"] is True and result["reason"] == "swarm-not-available"
        assert c.assess_modification_risk({"file_path": "pyproject.toml", "code": ""}) == "high"
    finally:
        await c.leave()
    with pytest.raises(swarm_notebook.NotJoinedError, match="left the swarm") as err:
        await c.delegate_task("python-computation", {"code": "1"})
    assert err.value.reason == swarm_notebook.Reason.NOT_JOINED_SWARM
    with pytest.raises(swarm_notebook.NotJoinedError):
        c.submit_task("python-computation", {"code": "1"})


async def test_a_default_worker_and_a_default_join_meet(
    server: SignalingServer, tmp_path: Path
) -> None:
    """Every entry point defaults to the same room, so defaults alone find each other."""
    assert build_parser({}).parse_args(["join"]).room == DEFAULT_ROOM
    for command in ("up", "worker"):
        assert cli_parser([command]).parse_args([command]).room == DEFAULT_ROOM
    worker = await WorkerProcess.start(server.url, None, str(tmp_path / "w"), name="w")
    c = await swarm_notebook.join(signaling=server.url, profile=tmp_path / "me")
    try:
        joined = asyncio.Event()

        def peer_joined(payload: dict[str, Any]) -> None:
            if payload["peer_id"] == worker.peer_id:
                joined.set()

        c.on("swarm:peer-joined", peer_joined)
        if worker.peer_id not in set(c.peers_frame().query("state == 'connected'").peer_id):
            await asyncio.wait_for(joined.wait(), 30)
        assert c.get_stats()["connected_peers"] == 1
    finally:
        await c.leave()
        assert await worker.stop() == 0
