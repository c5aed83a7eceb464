"""``%swarm roster`` in a real IPython shell: the roster it makes reaches a worker process
that trusts the notebook as owner, and votes then follow it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from swarm_notebook.errors import SwarmError
from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import load_roster
from swarm_notebook.notebook.session import run_blocking
from tests.support.procs import WorkerProcess, child_processes
from tests.support.shell import loaded_shell, wait_until
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(180)

ROOM = "roster-magic"


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    with loaded_shell() as ip:
        yield ip


def test_swarm_roster_makes_shares_and_enforces_the_roster(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    swarm = Swarm(tmp_path / "swarm", room=ROOM)
    profile = tmp_path / "notebook"
    me = Identity.load_or_create(profile)
    try:
        worker = swarm.net.run_sync(
            WorkerProcess.start(
                swarm.url, ROOM, str(tmp_path / "w"), "--roster-owner", me.peer_id, name="w"
            ),
            timeout=90,
        )
        swarm.workers.append(worker)
        shell.run_line_magic("swarm", f"join {ROOM} --signaling {swarm.url} --profile {profile}")
        session = shell.swarm_notebook_session  # type: ignore[attr-defined]
        coordinator = session.require()
        wait_until(lambda: coordinator.get_stats()["connected_peers"] == 1, 30, "the worker")
        capsys.readouterr()

        shell.run_line_magic("swarm", "roster")
        assert "open room" in capsys.readouterr().out
        with pytest.raises(SwarmError) as bad:
            shell.run_line_magic("swarm", f"roster add {worker.peer_id.upper()}")
        assert bad.value.reason == "bad-id"

        shell.run_line_magic("swarm", f"roster add {worker.peer_id} --name w")
        shown = capsys.readouterr().out
        assert "roster v2 owned by" in shown and " w\n" in shown
        saved = load_roster(profile, ROOM)
        assert saved is not None and set(saved.ids) == {me.peer_id, worker.peer_id}
        info = coordinator.roster()
        assert info["electorate"] == "roster" and info["owner"] == me.peer_id

        # The worker took the roster from the room (it trusts this owner) and votes on it.
        change = {"file_path": "analysis/a.py", "code": "x = 1", "reason": "tidy"}
        result = run_blocking(coordinator.request_modification_consensus(change), timeout=60)
        assert (result["consensus"], result["electorate"]) == (True, "roster")
        assert list(result["votes"]) == [worker.peer_id]

        # Off the roster, the worker is no longer asked: nobody is left to vote.
        shell.run_line_magic("swarm", f"roster remove {worker.peer_id}")
        result = run_blocking(coordinator.request_modification_consensus(change), timeout=60)
        assert (result["consensus"], result["reason"]) == (False, "quorum-unreachable")
        shell.run_line_magic("swarm", "leave")
    finally:
        swarm.close()
    assert child_processes() == []
