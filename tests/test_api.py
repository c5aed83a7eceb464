"""The public facade on its own: a lone peer joined through a real signaling server."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import swarm_notebook
from swarm_notebook.signaling import SignalingServer


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
