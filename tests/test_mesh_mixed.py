"""A room where one peer links with aiortc and the other with libdatachannel (``native``).

Two processes on two interpreters (the native backend needs CPython >= 3.13, the test
suite may run on 3.11) meet through a real signaling server: the link must authenticate
(the proof of identity covers both ends' DTLS fingerprints, whatever library made them),
and a delegation must run each way, in each peer's own sandbox.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import swarm_notebook.environment as environment
from swarm_notebook.client import join
from swarm_notebook.errors import EnvironmentMismatchWarning
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.transport.backends.select import backend_name
from tests.support.native_python import native_python
from tests.support.procs import REPO, PeerProcess
from tests.test_delegation import capable_peers

pytestmark = pytest.mark.timeout(180)


def other_side() -> tuple[str, str | None]:
    """(backend, interpreter) for the child: the backend this process does not use."""
    if backend_name() == "native":
        return "aiortc", sys.executable
    return "native", native_python()


async def test_aiortc_and_native_peers_share_a_room_and_delegate_both_ways(
    server: SignalingServer, tmp_path: Path
) -> None:
    mine = backend_name()
    theirs, python = other_side()
    if python is None:
        pytest.skip(
            "no Python >= 3.13 with libdatachannel-py here: `./dev test` makes .venv313 "
            "when python3.13 exists (python3.13 -m venv .venv313; pip install -e '.[test,native]')"
        )
    env = {environment.TRANSPORT_BACKEND: theirs, "PYTHONPATH": REPO}
    child = await PeerProcess.start(
        "mixed_peer.py",
        "--signaling",
        server.url,
        "--room",
        "mixed",
        "--profile",
        str(tmp_path / "child"),
        name=f"{theirs}-peer",
        env=env,
        python=python,
    )
    try:
        ready = await child.wait_for(lambda e: e.get("event") == "ready", 90)
        assert ready["backend"] == theirs
        c = await join(
            "mixed",
            signaling=server.url,
            profile=tmp_path / "me",
            capabilities=["python-execution"],
        )
        try:
            await capable_peers(c, 1)
            stats = c.get_stats()
            assert stats["transport_backend"] == mine
            (peer,) = stats["peers"]
            # The link is up only after both ends proved their keys over it.
            assert peer["id"] == ready["peer_id"] and peer["state"] == "connected"
            assert peer["transport_backend"] == theirs

            code = "import sys\nlist(sys.version_info[:2])"
            with warnings.catch_warnings():
                # The two venvs may carry other numpy/pandas versions: that is expected here.
                warnings.simplefilter("ignore", EnvironmentMismatchWarning)
                there = await c.delegate_task("python-computation", {"code": code}, timeout=60)
            assert there["success"] and there["peer"] == ready["peer_id"]
            assert there["value"] == ready["python"]

            # And back: the child delegates to us, over the same mixed link.
            reply = await child.call("delegate", timeout=90, code=code)
            back: dict[str, Any] = reply["result"]
            assert back["success"] and back["peer"] == stats["local_peer_id"]
            assert back["value"] == list(sys.version_info[:2])
            child_stats = (await child.call("stats"))["stats"]
            (me_seen,) = child_stats["peers"]
            assert me_seen["transport_backend"] == mine
            assert child_stats["tasks_completed"] == 1
            assert c.get_stats()["tasks_served"] == 1
            assert c._core.node.transport.stats()["rejections"] == {}
        finally:
            await c.leave()
    finally:
        code = await child.stop()
        assert code == 0, "".join(child.stderr_lines[-30:])
        assert child.problems() == [], child.problems()
    assert os.environ.get(environment.TRANSPORT_BACKEND, mine) == mine
