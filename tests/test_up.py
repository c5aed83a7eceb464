"""``swarm-notebook up --no-lab`` as a real process: server, workers, secret, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from swarm_notebook.client import join
from swarm_notebook.errors import SignalingRefused
from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import load_roster
from tests.support.procs import child_processes

pytestmark = pytest.mark.timeout(240)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines())
    return {key: value for key, value in pairs}


async def read_until_ready(proc: asyncio.subprocess.Process, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []

    async def collect() -> None:
        while line := await proc.stdout.readline():  # type: ignore[union-attr]
            lines.append(line.decode())
            if line.startswith(b"ready:"):
                return
        raise AssertionError(f"up exited before it was ready: {lines}")

    await asyncio.wait_for(collect(), timeout)
    return lines


async def test_up_runs_a_local_swarm_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    # Hold the port `up` is asked to use: it must say so and use another one.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    workdir = tmp_path / "work"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "up", "--no-lab", "--workers", "2",
        "--dir", str(workdir), "--port", str(busy_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    coordinator = None
    try:
        lines = await read_until_ready(proc, 120)
        text = "".join(lines)
        assert f"port {busy_port} is busy" in text
        workers = [line for line in lines if line.startswith("local-worker-")]
        assert len(workers) == 2 and all("python-execution" in w for w in workers)

        session_file = workdir / ".swarm" / "session.env"
        assert stat.S_IMODE(session_file.stat().st_mode) == 0o600  # it holds the secret
        session = read_env(session_file)
        url = session["SWARM_NOTEBOOK_SIGNALING"]
        assert url in text and session["SWARM_NOTEBOOK_SECRET"] not in text
        assert session["SWARM_NOTEBOOK_ICE_HOSTS"] == "127.0.0.1"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port != busy_port
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/healthz"
        ) as response:
            assert response.status == 200 and await response.text() == "ok"

        # Without the session's secret nobody gets in.
        with pytest.raises(SignalingRefused):
            await join(session["SWARM_NOTEBOOK_ROOM"], signaling=url, profile=tmp_path / "x")

        coordinator = await join(
            session["SWARM_NOTEBOOK_ROOM"], signaling=url,
            secret=session["SWARM_NOTEBOOK_SECRET"], profile=tmp_path / "me",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while coordinator.get_stats()["connected_peers"] < 2:
            assert time.monotonic() < deadline, coordinator.get_stats()
            await asyncio.sleep(0.05)  # re-check the peer count; it is the condition
        results = await asyncio.gather(
            *(coordinator.delegate_task("python-computation", {"code": f"{i} ** 2"})
              for i in range(6))
        )
        assert [r["value"] for r in results] == [i * i for i in range(6)]
        worker_ids = {w.split()[1].rstrip("…") for w in workers}
        assert {r["peer"][:16] for r in results} <= worker_ids
        # The notebook and the workers are the roster (owned by the notebook's key); we
        # joined with the secret and are served, but our proposals get no vote.
        state, room = workdir / ".swarm", session["SWARM_NOTEBOOK_ROOM"]
        roster = load_roster(state / "notebooks", room)
        assert roster is not None
        assert roster.owner == Identity.load_or_create(state / "notebooks").peer_id
        assert sorted(m.name for m in roster.members) == [
            "local-worker-1", "local-worker-2", "notebook"
        ]  # fmt: skip
        assert {r["peer"] for r in results} <= set(roster.ids)
        for i in (1, 2):
            assert load_roster(state / "workers" / f"worker-{i}", room) == roster
        outsider = await coordinator.request_modification_consensus(
            {"file_path": "notes.md", "code": "# hi", "reason": "x"}
        )
        assert outsider["consensus"] is False and outsider["electorate"] == "open"
        assert set(outsider["member_errors"].values()) == {"roster-mismatch"}
        await coordinator.leave()
        # A kernel of `up` trusts the owner named in the session: it gets the roster from
        # the workers and its proposals go to the roster (it is not on it itself).
        coordinator = await join(
            room, signaling=url, secret=session["SWARM_NOTEBOOK_SECRET"],
            profile=tmp_path / "kernel", roster_owner=session["SWARM_NOTEBOOK_ROSTER_OWNER"],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while coordinator.roster()["electorate"] != "roster":
            assert time.monotonic() < deadline, coordinator.roster()
            await asyncio.sleep(0.05)  # re-check; the roster's arrival is the condition
        voted = await coordinator.request_modification_consensus(
            {"file_path": "notes.md", "code": "# hi", "reason": "x"}
        )
        assert (voted["consensus"], voted["electorate"]) == (True, "roster")
        assert set(voted["votes"]) <= set(roster.ids)
        await coordinator.leave()
        coordinator = None

        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 90)
        assert proc.stdout is not None and proc.stderr is not None
        rest = (await proc.stdout.read()).decode()
        errors = (await proc.stderr.read()).decode()
        assert code == 0, rest + errors
        assert "stopped" in rest and "Traceback" not in errors, errors
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left behind: {alive}"
        assert not session_file.exists()
    finally:
        busy.close()
        if coordinator is not None:
            await coordinator.leave()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert child_processes() == []


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(text in part for part in cmdline):
            found.append(process)
    return found


async def test_sigterm_during_startup_leaves_nothing_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "starting"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "up", "--no-lab", "--workers", "2",
        "--dir", str(workdir), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert first.startswith(b"signaling")  # workers are being started right now
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 90)
        rest = (await proc.stdout.read()).decode()
        errors = (await proc.stderr.read()).decode()
        assert code == 0, rest + errors
        assert "ready:" not in rest and rest.rstrip().endswith("stopped")
        assert "Traceback" not in errors, errors
        assert processes_mentioning(str(workdir)) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_do_not_outlive_a_killed_up(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "up", "--no-lab", "--workers", "1",
        "--dir", str(tmp_path / "work"), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    await read_until_ready(proc, 120)
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True)
        if "worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1
    proc.kill()  # no chance to clean up: the worker must notice on its own
    await proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [] and len(gone) == 1
    assert child_processes() == []
