"""Sessions against real workers: a namespace kept in one peer's sandbox across calls.

``swarm-notebook worker`` processes behind a real signaling server; the notebook side is
the public API (``c.session``) and ``%%swarm run --session`` in a real IPython shell.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

import swarm_notebook
from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import SessionLostError, TaskRefused
from swarm_notebook.notebook.session import run_blocking
from swarm_notebook.sessions import RemoteSession
from tests.support.procs import WorkerProcess, child_processes
from tests.support.shell import joined_shell, wait_until
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(300)

ROOM = "sessions"


def counter(step: int) -> int:
    global count  # the session's namespace keeps it between calls
    count = globals().get("count", 0) + step
    return count


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    running = Swarm(tmp_path_factory.mktemp("swarm"), room=ROOM)
    try:
        running.start_worker("w0", "python-execution")
        yield running
    finally:
        running.close()
    wait_until(lambda: child_processes() == [], 30, "no leftover processes")


@pytest.fixture(scope="module")
def shell(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    with joined_shell(ROOM, swarm.url, tmp_path_factory.mktemp("notebook")) as ip:
        yield ip


@pytest.fixture
def c(shell: InteractiveShell, swarm: Swarm) -> Coordinator:
    coordinator = swarm_notebook.current()
    wait_until(lambda: capable(coordinator, swarm.workers[0].peer_id), 30, "the worker")
    return coordinator


def capable(c: Coordinator, peer_id: str) -> bool:
    peers = {p["id"]: p for p in c.get_stats()["peers"]}
    peer = peers.get(peer_id)
    return bool(peer and "python-execution" in peer["capabilities"])


def in_flight(c: Coordinator, peer_id: str) -> int:
    peer = next(p for p in c.get_stats()["peers"] if p["id"] == peer_id)
    return int(peer["in_flight"])


def test_state_stays_across_calls_and_the_session_holds_a_slot(
    c: Coordinator, swarm: Swarm
) -> None:
    worker = swarm.workers[0].peer_id
    s = c.session("keep", peer=worker)
    assert isinstance(s, RemoteSession) and s.peer == worker and s.state == "open"
    assert c.session("keep") is s  # the same handle, not a second session
    s.run("import numpy as np\nw = np.arange(4)\nopen('notes.txt', 'w').write('hi')").result(60)
    s.run("w = w * 10").result(timeout=60)
    assert s.run("int(w.sum())").result(timeout=60) == 60
    assert s.run("open('notes.txt').read()").result(timeout=60) == "hi"  # its scratch too
    assert [s.submit(counter, 2).result(timeout=60) for _ in range(3)] == [2, 4, 6]
    assert s.run("counter(10)").result(timeout=60) == 16  # the function lives there now
    # A plain task gets a fresh namespace: the session's state is not visible to it.
    plain = c.submit(counter, 1, peer=worker)
    assert plain.result(timeout=60) == 1
    # Idle, the session still holds one of the worker's slots (the card says so).
    wait_until(lambda: in_flight(c, worker) == 1, 30, "the session's slot in the load")
    frame = c.sessions_frame()
    assert frame.loc[frame["name"] == "keep", "runs"].iloc[0] == 8
    assert frame.loc[frame["name"] == "keep", "peer_name"].iloc[0] == "w0"
    s.close()
    assert s.state == "closed"
    assert "keep" not in set(c.sessions_frame()["name"])
    wait_until(lambda: in_flight(c, worker) == 0, 30, "the slot to come back")
    with pytest.raises(swarm_notebook.SwarmError):
        s.run("1")


def test_only_the_owner_may_use_it(c: Coordinator, swarm: Swarm, tmp_path: Path) -> None:
    worker = swarm.workers[0].peer_id
    mine = c.session("owned", peer=worker)
    assert mine.run("secret = 42").result(timeout=60) is None
    other = run_blocking(join(ROOM, signaling=swarm.url, profile=tmp_path / "other"))
    try:
        wait_until(lambda: capable(other, worker), 30, "the other notebook to see the worker")
        with pytest.raises(TaskRefused) as refused:
            other.session("owned", peer=worker)
        assert refused.value.reason == "not-session-owner"
        # Running in it by name is refused too, and the state is untouched.
        task = other.submit_task(
            "python-computation",
            {"code": "secret", "session": "owned", "session_op": "run"},
            peer=worker,
        )
        with pytest.raises(TaskRefused) as run_refused:
            task.future.result(60)
        assert run_refused.value.reason == "not-session-owner"
    finally:
        run_blocking(other.leave(), timeout=60)
    assert mine.run("secret").result(timeout=60) == 42
    mine.close()


def test_an_idle_session_expires_and_is_not_re_created(c: Coordinator, swarm: Swarm) -> None:
    worker = swarm.workers[0].peer_id
    s = c.session("brief", peer=worker, idle_timeout=1.0)
    assert s.idle_timeout_s == 1.0
    s.run("x = 1").result(timeout=60)
    # Expiry gives the slot back; the load on the worker's card is the sync point.
    wait_until(lambda: in_flight(c, worker) == 0, 30, "the session to expire")
    with pytest.raises(SessionLostError) as lost:
        s.run("x").result(timeout=60)
    assert "expired after 1 s idle" in lost.value.message
    assert s.state == "lost"
    before = len(c.task_records())
    with pytest.raises(SessionLostError):
        s.run("x")  # refused here at once, nothing sent
    assert len(c.task_records()) == before
    fresh = c.session("brief", peer=worker)  # opening again is explicit, and starts empty
    assert fresh is not s
    assert fresh.run("'x' in globals()").result(timeout=60) is False
    fresh.close()


def test_a_dead_sandbox_loses_the_session(c: Coordinator, swarm: Swarm) -> None:
    worker = swarm.workers[0].peer_id
    s = c.session("fragile", peer=worker)
    s.run("y = 5").result(timeout=60)
    with pytest.raises(SessionLostError) as lost:
        s.run("import os\nos._exit(3)").result(timeout=60)
    assert "sandbox" in lost.value.message
    with pytest.raises(SessionLostError):
        s.run("y")
    wait_until(lambda: in_flight(c, worker) == 0, 30, "the slot to come back")


def test_a_dead_peer_loses_the_session(c: Coordinator, swarm: Swarm, tmp_path: Path) -> None:
    doomed: WorkerProcess = swarm.start_worker("doomed", "python-execution")
    wait_until(lambda: capable(c, doomed.peer_id), 60, "the doomed worker")
    s = c.session("on-doomed", peer=doomed.peer_id)
    s.run("z = 1").result(timeout=60)
    doomed.kill()
    # Reported as soon as the link goes (heartbeats notice within seconds), before any use.
    wait_until(lambda: s.state == "lost", 60, "the session to be reported lost")
    with pytest.raises(SessionLostError) as lost:
        s.run("z")
    assert lost.value.peer == doomed.peer_id and "went away" in lost.value.message
    frame = c.sessions_frame()
    row = frame[frame["name"] == "on-doomed"].iloc[0]
    assert row["state"] == "lost" and "went away" in row["lost_because"]


def test_swarm_run_session_keeps_variables_between_cells(
    shell: InteractiveShell, c: Coordinator
) -> None:
    shell.user_ns["base"] = 7
    first = shell.run_cell("%%swarm run --session cells --push base\nacc = [base]\nlen(acc)")
    assert first.error_in_exec is None, first.error_in_exec
    assert first.result == 1
    second = shell.run_cell("%%swarm run --session cells --pull acc\nacc.append(8)\nsum(acc)")
    assert second.error_in_exec is None, second.error_in_exec
    assert second.result == 15 and shell.user_ns["acc"] == [7, 8]
    plain = shell.run_cell("%%swarm run\n'acc' in globals()")
    assert plain.result is False
    swarm_notebook.current().session("cells").close()


def test_a_peer_keeps_a_slot_for_ordinary_tasks(c: Coordinator, swarm: Swarm) -> None:
    worker = swarm.workers[0].peer_id
    s = c.session("only", peer=worker)
    with pytest.raises(TaskRefused) as refused:
        c.session("second", peer=worker)
    assert refused.value.reason == "too-many-sessions"
    assert c.submit(counter, 3, peer=worker).result(timeout=60) == 3  # still served
    s.close()
