"""Sharp edges a new user met (issue #13 item 7), each held by a test that fails without its fix.

Network cases use a real signaling server and worker processes; the rest are pure views.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pandas as pd
import pytest
from IPython.core.interactiveshell import InteractiveShell

from swarm_notebook.client import default_peer_name, join
from swarm_notebook.errors import (
    SignalingRefused,
    SignalingUnavailable,
    SignalingURLError,
    UsageError,
)
from swarm_notebook.identity import Identity
from swarm_notebook.notebook.magics import build_parser
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.signaling.url import normalize_url
from swarm_notebook.views.frames import stats_frame, tasks_frame
from swarm_notebook.views.status import dashboard_status, format_rate, success_rate
from tests.support.procs import start_workers
from tests.support.shell import loaded_shell
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- signaling URLs --------------------------------------------------------------------


def test_bare_url_gets_the_ws_path_and_wrong_schemes_say_what_to_type() -> None:
    assert normalize_url("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765/ws"
    assert normalize_url("ws://127.0.0.1:8765/") == "ws://127.0.0.1:8765/ws"
    assert normalize_url("wss://h.example/x/ws") == "wss://h.example/x/ws"
    with pytest.raises(SignalingURLError) as err:
        normalize_url("http://127.0.0.1:8765")
    assert err.value.reason == "bad-signaling-url"
    assert "ws://127.0.0.1:8765/ws" in err.value.message
    assert isinstance(err.value, UsageError)
    with pytest.raises(SignalingURLError):
        normalize_url("ws://127.0.0.1:notaport/ws")


async def test_join_accepts_the_bare_url(server: SignalingServer, tmp_path: Path) -> None:
    bare = server.url.removesuffix("/ws")
    c = await join("bare", signaling=bare, profile=tmp_path / "nb")
    try:
        assert c.signaling == server.url
        assert c.is_initialized
    finally:
        await c.leave()


async def test_join_with_no_server_fails_at_once_saying_how_to_get_one(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    started = time.monotonic()
    with pytest.raises(SignalingUnavailable) as err:
        await join("nobody", signaling=url, profile=tmp_path / "nb")
    # Before: ten seconds of retries, then "Connect call failed" and nothing else.
    assert time.monotonic() - started < 5.0
    assert err.value.reason == "signaling-unreachable"
    assert url in err.value.message
    assert "%swarm local" in err.value.message and "swarm-notebook up" in err.value.message


async def test_a_path_the_server_does_not_serve_fails_at_once_with_the_right_one(
    server: SignalingServer, tmp_path: Path
) -> None:
    wrong = server.url.replace("/ws", "/signal")
    started = time.monotonic()
    with pytest.raises(SignalingRefused) as err:
        await join("wrong", signaling=wrong, profile=tmp_path / "nb")
    assert time.monotonic() - started < 5.0  # not the 10 s join timeout
    assert err.value.reason == "bad-signaling-url"
    assert "404" in err.value.message and server.url in err.value.message


# -- a task right after join waits for a capable peer's card ---------------------------


async def test_delegate_right_after_join_waits_for_the_card(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "fresh", tmp_path, 1, "--caps", "python-execution")
    waits: list[dict[str, object]] = []
    try:
        c = await join("fresh", signaling=server.url, profile=tmp_path / "nb")
        try:
            c.on("task:waiting", waits.append)
            # No settle, no wait_for_peers: the link and its card are still on their way.
            r = await c.delegate_task("python-computation", {"code": "6 * 7"})
            assert r["success"] and r["value"] == 42 and r["peer"] == workers[0].peer_id
            assert c.get_stats()["tasks_not_sent"] == 0
        finally:
            await c.leave()
    finally:
        for w in workers:
            assert await w.stop() == 0


# -- leave, then join again in the same process ----------------------------------------


async def test_leave_then_join_reconnects_at_once_whichever_side_dials(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "again", tmp_path, 1, "--caps", "python-execution")
    worker = workers[0]
    # The lower id dials: one notebook key below the worker's, one above, so both the
    # offering and the answering side of the mesh rejoin.
    profiles: dict[bool, Path] = {}
    for i in range(64):
        below = Identity.load_or_create(tmp_path / f"nb{i}").peer_id < worker.peer_id
        profiles.setdefault(below, tmp_path / f"nb{i}")
        if len(profiles) == 2:
            break
    assert len(profiles) == 2
    try:
        for profile in profiles.values():
            for _ in range(2):  # join, work, leave; then the same again at once
                c = await join("again", signaling=server.url, profile=profile)
                try:
                    # No settle: the bounded card wait is all the slack it gets (it was
                    # 25-35 s of no-capable-peer after a rejoin).
                    r = await c.delegate_task("python-computation", {"code": "1 + 1"})
                    assert r["success"] and r["peer"] == worker.peer_id
                finally:
                    await c.leave()
    finally:
        assert await worker.stop() == 0
        assert worker.problems() == []


# -- names -------------------------------------------------------------------------------


def test_notebook_peers_are_named_after_user_and_notebook() -> None:
    env = {"USER": "alice", "JPY_SESSION_NAME": "/home/alice/work/Quick start.ipynb"}
    assert default_peer_name(env) == "alice/Quick start"
    assert default_peer_name({"USER": "bob"}) == "bob/python"


def test_tasks_frame_shows_the_card_name_and_keeps_the_id_in_its_own_column() -> None:
    peer = "P" * 52
    records = [
        {"id": "t1", "type": "python-computation", "peer": peer, "state": "completed"},
        {"id": "t2", "type": "python-computation", "peer": "Q" * 52, "state": "failed"},
        {"id": "t3", "type": "python-computation", "peer": None, "state": "rejected"},
    ]
    frame = tasks_frame(records, peer_names={peer: "worker-1"})
    assert frame.loc["t1", "peer"] == "worker-1"
    assert frame.loc["t1", "peer_id"] == peer
    assert frame.loc["t2", "peer"] == "Q" * 16 + "…"  # no card: the short id
    assert pd.isna(frame.loc["t3", "peer"]) and pd.isna(frame.loc["t3", "peer_id"])


# -- the success rate --------------------------------------------------------------------


def test_success_rate_reads_dash_with_no_tasks_and_ignores_local_errors_and_cancels() -> None:
    assert success_rate({}) is None
    assert format_rate(success_rate({"total_tasks": 0})) == "-"
    assert dashboard_status({"initialized": True})["success_rate"] is None
    assert pd.isna(stats_frame({})["success_rate"].iloc[0])
    # 3 completed; 1 failed on a peer; 2 never left the notebook; 4 canceled by the user.
    snapshot = {
        "total_tasks": 10,
        "tasks_completed": 3,
        "tasks_failed": 3,
        "tasks_not_sent": 2,
        "tasks_canceled": 4,
    }
    assert success_rate(snapshot) == 75
    assert stats_frame(snapshot)["success_rate"].iloc[0] == 75.0


# -- %swarm help -----------------------------------------------------------------------


@pytest.fixture
def shell() -> InteractiveShell:
    with loaded_shell() as ip:
        yield ip


def test_bare_swarm_shows_the_help(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%swarm")
    assert result.error_in_exec is None
    out = capsys.readouterr().out
    assert "usage: %swarm" in out and "join" in out and "leave" in out
    assert "usage: usage:" not in out


def test_bad_flag_says_usage_once(shell: InteractiveShell) -> None:
    result = shell.run_cell("%swarm join --no-such-flag")
    error = result.error_in_exec
    assert isinstance(error, UsageError)
    assert "usage: usage:" not in error.message and "usage: %swarm" in error.message


def test_join_help_describes_room_signaling_secret_and_their_variables() -> None:
    parser = build_parser({})
    join_parser = next(
        action.choices["join"]
        for action in parser._actions
        if getattr(action, "choices", None) and "join" in action.choices
    )
    text = " ".join(join_parser.format_help().split())
    for words in (
        "room to join (default: $SWARM_NOTEBOOK_ROOM",
        "--signaling URL signaling server",
        "$SWARM_NOTEBOOK_SIGNALING",
        "$SWARM_NOTEBOOK_SECRET",
        "--name NAME",
        "%swarm local",
    ):
        assert words in text, words


def test_join_output_names_us_and_the_peers(
    tmp_path: Path, shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    swarm = Swarm(tmp_path / "swarm", room="named")  # its server runs on a loop of its own
    try:
        worker = swarm.start_worker("w0", "python-execution")
        result = shell.run_cell(
            f"%swarm join named --signaling {swarm.url} --profile {tmp_path / 'nb'} "
            "--name alice/analysis"
        )
        assert result.error_in_exec is None, result.error_in_exec
        out = capsys.readouterr().out
        assert "as alice/analysis (" in out
        assert f"w0 ({worker.peer_id[:16]}…)  connected  python-execution" in out
        assert shell.run_cell("%swarm leave").error_in_exec is None
    finally:
        swarm.close()


def test_swarm_join_with_no_server_says_how_to_get_one(shell: InteractiveShell) -> None:
    url = f"ws://127.0.0.1:{free_port()}"  # bare, as people type it
    started = time.monotonic()
    error = shell.run_cell(f"%swarm join lab --signaling {url}").error_in_exec
    assert time.monotonic() - started < 5.0
    assert isinstance(error, SignalingUnavailable) and error.reason == "signaling-unreachable"
    assert f"{url}/ws" in error.message and "%swarm local 2" in error.message


def test_the_progress_line_says_what_a_task_without_a_peer_waits_for() -> None:
    from swarm_notebook.notebook.handle import TaskProgress
    from swarm_notebook.notebook.progress import describe

    waiting = TaskProgress("t1", None, "submitted", 0, 0.4, None, "a capable peer's agent card")
    line = describe(waiting, "python-computation")
    assert line == "⏳ python-computation · waiting for a capable peer's agent card · 0.4 s"
