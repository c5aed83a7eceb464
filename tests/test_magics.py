"""``%swarm`` / ``%%swarm run`` in a real IPython shell against real peers.

The shell runs in this process (as in terminal IPython: no running loop, so the magics
block while the coordinator's thread works); the signaling server runs on a background
loop here and the workers are ``swarm-notebook worker`` processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from IPython.core.interactiveshell import ExecutionResult, InteractiveShell

import swarm_notebook
from swarm_notebook.errors import (
    DelegationError,
    IceConfigError,
    NoCapablePeerError,
    NotJoinedError,
    RemoteTaskError,
    SwarmError,
    UsageError,
    WaitTimeout,
)
from swarm_notebook.notebook.handle import TaskHandle
from swarm_notebook.notebook.session import run_blocking
from swarm_notebook.transport.backends.select import backend_name
from tests.support.procs import child_processes
from tests.support.shell import loaded_shell, wait_until
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(240)

ROOM = "magics"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    running = Swarm(tmp_path_factory.mktemp("swarm"), room=ROOM)
    try:
        running.start_worker("w0", "python-execution")
        running.start_worker("w1", "python-execution", "file-management")
        yield running
    finally:
        running.close()
    assert child_processes() == []


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    with loaded_shell() as ip:
        yield ip


@pytest.fixture
def joined(
    shell: InteractiveShell, swarm: Swarm, tmp_path_factory: pytest.TempPathFactory
) -> InteractiveShell:
    session = shell.swarm_notebook_session  # type: ignore[attr-defined]
    if session.coordinator is None or not session.coordinator.is_initialized:
        profile = tmp_path_factory.mktemp("notebook")
        ok(shell.run_cell(f"%swarm join {ROOM} --signaling {swarm.url} --profile {profile}"))
    return shell


def ok(result: ExecutionResult) -> Any:
    if result.error_in_exec is not None:
        raise result.error_in_exec
    assert result.error_before_exec is None
    return result.result


def failed(result: ExecutionResult) -> BaseException:
    assert result.error_in_exec is not None, "the cell should have failed"
    return result.error_in_exec


def test_misuse_before_join_is_explained(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    for line in (
        "%swarm peers",
        "%swarm status",
        "%swarm tasks",
        "%swarm dashboard",
        "%swarm doctor",
    ):
        error = failed(shell.run_cell(line))
        assert isinstance(error, NotJoinedError) and error.reason == "not-joined", line
    error = failed(shell.run_cell("%%swarm run\n1 + 1"))
    assert isinstance(error, NotJoinedError) and error.reason == "not-joined"
    out = capsys.readouterr().out
    # Shown as one short line with the fix, not as a local traceback.
    assert "%swarm join ROOM" in out and "Traceback" not in out and "magics.py" not in out
    with pytest.raises(NotJoinedError, match="not-joined"):
        swarm_notebook.current()

    error = failed(shell.run_cell("%swarm join --bogus"))
    assert isinstance(error, UsageError) and error.reason == "bad-arguments"
    assert "unrecognized arguments: --bogus" in error.message and "usage: %swarm" in error.message
    # An unusable ICE setting stops the join at once (nothing listens on port 9).
    error = failed(
        shell.run_cell("%swarm join --signaling ws://127.0.0.1:9/ws --ice-server turn:t.example")
    )
    assert isinstance(error, IceConfigError) and error.reason == "bad-ice-config"
    assert "needs 'username' and 'credential'" in error.message
    error = failed(shell.run_cell("%swarm frobnicate"))
    assert isinstance(error, UsageError) and "invalid choice" in error.message
    assert "bad-arguments" in capsys.readouterr().out


def test_join_status_peers_and_current(
    joined: InteractiveShell, swarm: Swarm, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinator = swarm_notebook.current()
    assert coordinator is joined.swarm_notebook_session.coordinator  # type: ignore[attr-defined]
    peers = ok(joined.run_cell("%swarm peers"))
    assert isinstance(peers, pd.DataFrame)
    assert set(peers["peer_id"]) == {w.peer_id for w in swarm.workers[:2]}
    assert (peers["state"] == "connected").all()
    assert peers["capabilities"].str.contains("python-execution").all()

    stats = ok(joined.run_cell("%swarm status"))
    assert isinstance(stats, pd.DataFrame) and int(stats["connected_peers"].iloc[0]) == 2
    assert re.search(r"active · 2 peers · \d+ tasks · room 'magics'", capsys.readouterr().out)

    error = failed(joined.run_cell(f"%swarm join {ROOM} --signaling {swarm.url}"))
    assert isinstance(error, UsageError) and error.reason == "already-joined"


def test_doctor_checks_signaling_and_every_link(
    joined: InteractiveShell, swarm: Swarm, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    ok(joined.run_cell("%swarm doctor"))
    out = capsys.readouterr().out
    assert f"ok   signaling: {swarm.url} answers" in out, out
    # Everything here is on loopback: host candidates on both ends (or the direct
    # backend's TCP stream), no ICE server.
    route = "direct (direct -> direct)" if backend_name() == "direct" else "host (host -> host)"
    for worker in swarm.workers[:2]:
        assert f"ok   link {worker.peer_id[:16]}: {route} via no server" in out, out
    assert "FAIL ice servers: none configured or issued" in out


def test_run_pushes_and_pulls_dataframes(
    joined: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    joined.user_ns["df"] = pd.DataFrame({"city": ["a", "b", "a"], "sales": [1.5, 2.0, 3.5]})
    joined.user_ns["weights"] = np.arange(3, dtype="float64")
    cell = (
        "%%swarm run --push df,weights --pull totals,scaled\n"
        "import sys\n"
        "print('rows', len(df))\n"
        "print('careful', file=sys.stderr)\n"
        "totals = df.groupby('city', as_index=False)['sales'].sum()\n"
        "scaled = weights * 2\n"
        "totals\n"
    )
    value = ok(joined.run_cell(cell))
    expected = pd.DataFrame({"city": ["a", "b"], "sales": [5.0, 2.0]})
    pd.testing.assert_frame_equal(value, expected)  # the last expression, as IPython shows it
    pd.testing.assert_frame_equal(joined.user_ns["totals"], expected)
    np.testing.assert_array_equal(joined.user_ns["scaled"], np.array([0.0, 2.0, 4.0]))
    captured = capsys.readouterr()
    assert "rows 3\n" in captured.out
    assert "careful\n" in captured.err
    # The progress summary: which peer, how long, how many attempts.
    assert re.search(
        r"✔ python-computation completed on w\d \(\w{16}…\) in [\d.]+ s \(1 attempt\)", captured.err
    )
    tasks = ok(joined.run_cell("%swarm tasks"))
    assert isinstance(tasks, pd.DataFrame) and (tasks["state"] == "completed").any()
    assert str(tasks["duration"].dtype) == "timedelta64[ns]"


def test_remote_error_shows_the_remote_traceback(
    joined: InteractiveShell, swarm: Swarm, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = "%%swarm run\nprint('before')\ndef divide(x):\n    return x / 0\ndivide(1)\n"
    error = failed(joined.run_cell(cell))
    assert isinstance(error, RemoteTaskError)
    assert error.peer in {w.peer_id for w in swarm.workers}
    assert "ZeroDivisionError" in error.error
    out = capsys.readouterr()
    assert "before\n" in out.out
    assert "Remote traceback (peer" in out.out
    assert "return x / 0" in out.out  # the remote source line, from the remote traceback
    assert "ZeroDivisionError: division by zero" in out.out
    # No local frames: the user sees the remote cell only.
    assert "magics.py" not in out.out and "interactiveshell.py" not in out.out
    # The peer by the name on its card and its id.
    name = next(w.name for w in swarm.workers if w.peer_id == error.peer)
    assert error.peer_name == name
    assert f"Remote traceback (peer {name} ({error.peer[:16]}…), task {error.task_id})" in out.out
    assert f"failed on peer {name} ({error.peer[:16]}…)" in out.out


def test_no_wait_returns_a_handle_and_lands_pulled_variables(joined: InteractiveShell) -> None:
    joined.user_ns["n"] = 5
    handle = ok(
        joined.run_cell(
            "%%swarm run --no-wait --push n --pull squares\n"
            "squares = [i * i for i in range(n)]\nlen(squares)\n"
        )
    )
    assert isinstance(handle, TaskHandle)
    assert handle.result(timeout=60) == 5
    assert handle.done()
    assert handle.outcome is not None and handle.outcome["state"] == "completed"
    assert joined.user_ns["squares"] == [0, 1, 4, 9, 16]

    # Variables land without anyone asking for the result.
    joined.user_ns.pop("late", None)
    handle = ok(joined.run_cell("%%swarm run --no-wait --pull late\nlate = 'here'\n"))
    assert handle.wait(timeout=60)
    assert joined.user_ns["late"] == "here"

    slow = ok(joined.run_cell("%%swarm run --no-wait\nimport time\ntime.sleep(30)\n"))
    assert not slow.done()
    assert slow.cancel()
    with pytest.raises(SwarmError, match="canceled"):
        slow.result(timeout=30)
    failing = ok(joined.run_cell("%%swarm run --no-wait\nraise ValueError('nope')\n"))
    with pytest.raises(RemoteTaskError, match="ValueError: nope"):
        failing.result(timeout=60)


def test_remote_traceback_line_numbers_are_the_cells(joined: InteractiveShell) -> None:
    # Cell lines: 1 %%swarm run, 2 x = 1, 3 (blank), 4 the division.
    error = failed(joined.run_cell("%%swarm run\nx = 1\n\nx / 0\n"))
    assert isinstance(error, RemoteTaskError)
    assert error.remote_traceback is not None and "line 4" in error.remote_traceback
    assert "line 3" not in error.remote_traceback


def test_no_wait_as_names_the_handle(joined: InteractiveShell) -> None:
    handle = ok(joined.run_cell("%%swarm run --no-wait --as h7\n6 * 7\n"))
    assert joined.user_ns["h7"] is handle and isinstance(handle, TaskHandle)
    joined.run_cell("other = 1")  # another cell in between: the name still holds the handle
    assert joined.user_ns["h7"].result(timeout=60) == 42
    error = failed(joined.run_cell("%%swarm run --as h8\n1\n"))
    assert isinstance(error, UsageError) and "--no-wait" in error.message
    bad = failed(joined.run_cell("%%swarm run --no-wait --as 8h\n1\n"))
    assert isinstance(bad, UsageError) and "variable name" in bad.message


def test_misuse_after_join_is_explained(joined: InteractiveShell, swarm: Swarm) -> None:
    error = failed(joined.run_cell("%%swarm run --frobnicate\n1"))
    assert isinstance(error, UsageError) and "unrecognized arguments" in error.message
    error = failed(joined.run_cell("%%swarm run --push nowhere_defined\n1"))
    assert isinstance(error, UsageError) and error.reason == "unknown-variable"
    assert "nowhere_defined" in error.message
    error = failed(joined.run_cell("%%swarm run --pull 'not a name'\n1"))
    assert isinstance(error, UsageError) and "not a Python variable name" in error.message
    error = failed(joined.run_cell("%swarm run"))
    assert isinstance(error, UsageError) and "%%swarm run" in error.message

    # No capable peer: the message lists the peers and what they offer.
    error = failed(joined.run_cell("%%swarm run --requires local-llm\n1"))
    assert isinstance(error, NoCapablePeerError) and error.reason == "no-capable-peer"
    assert "local-llm" in error.message and "connected peers:" in error.message
    assert swarm.workers[0].peer_id[:16] in error.message
    assert "file-management" in error.message

    error = failed(joined.run_cell("%%swarm run --peer NOSUCHPEER\n1"))
    assert isinstance(error, UsageError) and error.reason == "peer-gone"
    assert "not in this room" in error.message


def test_requires_and_peer_pick_the_right_peer(joined: InteractiveShell, swarm: Swarm) -> None:
    w1 = swarm.workers[1]
    ok(joined.run_cell("%%swarm run --requires file-management --pull where\nwhere = 1\n"))
    assert swarm_notebook.current().tasks_frame()["peer_id"].iloc[-1] == w1.peer_id
    w0 = swarm.workers[0]
    ok(joined.run_cell(f"%%swarm run --peer {w0.peer_id[:10]}\n2\n"))
    assert swarm_notebook.current().tasks_frame()["peer_id"].iloc[-1] == w0.peer_id


def test_needs_picks_peers_by_package_versions(joined: InteractiveShell) -> None:
    assert ok(joined.run_cell("%%swarm run --needs 'numpy>=1' --needs pandas>=1\n1 + 2\n")) == 3
    error = failed(joined.run_cell("%%swarm run --needs 'pandas>=99'\n1\n"))
    assert isinstance(error, NoCapablePeerError) and error.reason == "unmet-requirement"
    assert "(needs >=99)" in error.message
    # A session opens only on a peer that has the versions too.
    error = failed(joined.run_cell("%%swarm run --session pinned --needs 'numpy<1'\n1\n"))
    assert isinstance(error, NoCapablePeerError) and error.reason == "unmet-requirement"
    error = failed(joined.run_cell("%%swarm run --needs pandas\n1\n"))
    assert isinstance(error, UsageError) and "version specifier" in error.message


def test_put_keeps_a_variable_remote_and_push_reuses_it_while_unchanged(
    joined: InteractiveShell,
) -> None:
    c = swarm_notebook.current()
    ok(joined.run_cell("import pandas as pd\nframe = pd.DataFrame({'a': range(1000)})\n"))
    ref = ok(joined.run_cell("%swarm put frame"))
    assert isinstance(ref, swarm_notebook.RemoteRef) and ref.size > 0 and ref.holders
    cell = "%%swarm run --push frame\nint(frame['a'].sum())\n"
    assert ok(joined.run_cell(cell)) == 499500
    assert ok(joined.run_cell(cell)) == 499500
    owned = c.refs_frame().query("role == 'owned'")
    assert owned["ref_id"].tolist() == [ref.ref_id]  # unchanged: the same ref both times
    ok(joined.run_cell("frame = pd.DataFrame({'a': range(10)})\n"))
    assert ok(joined.run_cell(cell)) == 45  # changed: the new value was put and used
    owned = c.refs_frame().query("role == 'owned'")
    assert ref.ref_id not in owned["ref_id"].tolist() and len(owned) == 1
    error = failed(joined.run_cell("%swarm put no_such_variable"))
    assert isinstance(error, UsageError) and "no_such_variable" in error.message


def test_peer_gone_mid_task(joined: InteractiveShell, swarm: Swarm) -> None:
    doomed = swarm.start_worker("doomed", "python-execution")
    coordinator = swarm_notebook.current()
    wait_until(
        lambda: (
            doomed.peer_id
            in set(coordinator.peers_frame().query("state == 'connected'")["peer_id"])
        ),
        30,
        "doomed joins",
    )
    handle = ok(
        joined.run_cell(
            f"%%swarm run --no-wait --peer {doomed.peer_id}\nimport time\ntime.sleep(60)\n"
        )
    )
    wait_until(lambda: handle.progress().state == "working", 30, "task working on doomed")
    doomed.kill()
    with pytest.raises(DelegationError) as caught:
        handle.result(timeout=60)
    assert caught.value.reason == "peer-gone" and doomed.peer_id[:16] in caught.value.message
    error = failed(joined.run_cell(f"%%swarm run --peer {doomed.peer_id}\n1"))
    assert isinstance(error, UsageError) and error.reason == "peer-gone"
    assert "is gone" in error.message


def test_leave_then_current_fails(
    joined: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    ok(joined.run_cell("%swarm leave"))
    assert "left room 'magics'" in capsys.readouterr().out
    with pytest.raises(NotJoinedError, match="not-joined"):
        swarm_notebook.current()
    ok(joined.run_cell("%swarm leave"))
    assert "nothing to leave" in capsys.readouterr().out


def test_use_makes_a_coordinator_joined_in_code_the_sessions(
    shell: InteractiveShell, swarm: Swarm, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if shell.swarm_notebook_session.coordinator is not None:  # type: ignore[attr-defined]
        ok(shell.run_cell("%swarm leave"))
    profile = tmp_path_factory.mktemp("coded")
    c = run_blocking(swarm_notebook.join(ROOM, signaling=swarm.url, profile=profile))
    try:
        assert swarm_notebook.use(c) is c and swarm_notebook.current() is c
        ready = run_blocking(
            swarm_notebook.wait_for_peers(c, 2, capability="python-execution", timeout=30)
        )
        assert ready >= 2
        peers = ok(shell.run_cell("%swarm peers"))  # the magics use it too
        assert {w.peer_id for w in swarm.workers[:2]} <= set(peers["peer_id"])
        assert c.peer_name(swarm.workers[0].peer_id) == swarm.workers[0].name
        # A task started from synchronous code and watched from this thread.
        task = c.submit_task("python-computation", {"code": "6 * 7"})
        assert task.future.result(60)["value"] == 42
        record = task.record()
        assert record is not None and record["id"] == task.task_id
        assert record["state"] == "completed"
        with pytest.raises(WaitTimeout):
            run_blocking(c.wait_for_peers(50, timeout=0.5))
        other = run_blocking(
            swarm_notebook.join(ROOM, signaling=swarm.url, profile=profile / "other")
        )
        try:
            with pytest.raises(UsageError) as err:
                swarm_notebook.use(other)
            assert err.value.reason == "already-joined"
        finally:
            run_blocking(other.leave())
    finally:
        ok(shell.run_cell("%swarm leave"))
    assert not c.is_initialized
    with pytest.raises(NotJoinedError):
        swarm_notebook.use(c)
