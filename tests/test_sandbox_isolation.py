"""Findings 3 and 4 of issue 10 as regression tests, on real bubblewrap and real processes.

Each attack runs as delegated task code and must fail; honest tasks keep working next to
them. Worker-level tests start the worker CLI (its own HOME, profile and key) and delegate
through a real signaling server on loopback; pool-level tests drive the sandbox pool the
worker uses, so that psutil can see every process of this machine after each task.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

from swarm_notebook.client import Coordinator, join
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.workload.executors import TaskContext
from swarm_notebook.workload.sandbox.bwrap import (
    bound_under_scratch,
    bubblewrap_problem,
    python_dirs,
)
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from tests.support.procs import WorkerProcess

pytestmark = pytest.mark.timeout(300)

OWNER_SECRET = "sk-owner-api-key-never-for-peers"
PY_CAPS = ("--caps", "python-execution")


def without_mount_parents(names: list[str]) -> list[str]:
    """Drop the folders bwrap creates in /tmp to hold a Python installed under /tmp (a
    virtualenv in a checkout under /tmp): read-only binds the per-task wipe keeps."""
    parents = {path.split("/")[2] for path in bound_under_scratch(python_dirs())}
    return [name for name in names if name not in parents]


def test_bubblewrap_is_usable_here() -> None:
    # Everything below relies on it; a machine without it must fail loudly, not skip.
    assert bubblewrap_problem() is None, bubblewrap_problem()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_code(c: Coordinator, code: str, **kw: Any) -> dict[str, Any]:
    return await c.delegate_task("python-computation", {"code": code, **kw}, timeout=60)


@pytest.fixture
def owner_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of the worker's owner with a private file; the worker inherits HOME."""
    home = tmp_path / "owner-home"
    home.mkdir()
    (home / "notes.txt").write_text("the owner's private notes", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OWNER_API_KEY", OWNER_SECRET)
    return home


# -- Finding 3 against a real worker process --------------------------------------------


async def test_task_code_cannot_reach_the_owner_keys_home_or_network(
    server: SignalingServer, tmp_path: Path, owner_home: Path
) -> None:
    profile = owner_home / ".swarm-notebook" / "worker"
    worker = await WorkerProcess.start(server.url, "iso", str(profile), *PY_CAPS)
    hits: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append("connected")
        writer.close()

    service = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    c = await join("iso", signaling=server.url, profile=tmp_path / "notebook")
    try:
        await wait_until(
            lambda: any(p["state"] == "connected" for p in c.get_stats()["peers"]), 30, "worker"
        )
        key_files = [p for p in profile.rglob("*") if p.is_file() and "identity" in p.name]
        assert key_files, "the worker wrote no identity key: the test would prove nothing"

        environ = await run_code(
            c,
            "import os\n"
            "seen = {}\n"
            "for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    try:\n"
            "        seen[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode()\n"
            "    except OSError as exc:\n"
            "        seen[pid] = type(exc).__name__\n"
            "seen",
        )
        assert environ["success"], environ
        dumped = "".join(environ["value"].values())
        assert OWNER_SECRET not in dumped and str(owner_home) not in dumped
        assert len(environ["value"]) <= 2  # only bwrap's init and the child itself

        for path in [*key_files, owner_home / "notes.txt"]:
            stolen = await run_code(c, f"open({str(path)!r}, 'rb').read()")
            assert not stolen["success"] and "FileNotFoundError" in stolen["error"], stolen

        planted = owner_home / "planted.py"
        write = await run_code(c, f"open({str(planted)!r}, 'w').write('owned')")
        assert not write["success"] and not planted.exists(), write

        dial = await run_code(
            c, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
        )
        assert not dial["success"] and dial["error_type"] == "remote-exception", dial
        assert "unreachable" in dial["error"] or "refused" in dial["error"], dial["error"]
        assert hits == []

        # The worker kept its identity and keeps serving honest work.
        honest = await run_code(c, "import pandas as pd\nprint('fine')\npd.Series([1, 2]).sum()")
        assert honest["success"] and honest["value"] == 3 and honest["stdout"] == "fine\n"
        peers = c.get_stats()["peers"]
        assert [p["id"] for p in peers] == [worker.peer_id]
        assert peers[0]["isolation"] == "bubblewrap"
        assert list(c.peers_frame()["isolation"]) == ["bubblewrap"]
    finally:
        await c.leave()
        service.close()
        await service.wait_closed()
        assert await worker.stop() == 0
        assert worker.problems() == []


async def test_sandboxes_die_with_a_killed_worker(server: SignalingServer, tmp_path: Path) -> None:
    worker = await WorkerProcess.start(server.url, "die", str(tmp_path / "w"), *PY_CAPS)
    parent = psutil.Process(worker.proc.pid)
    inside: list[psutil.Process] = []

    def warm() -> bool:
        inside[:] = [p for p in parent.children(recursive=True) if p.name() != "bwrap"]
        return len(inside) >= 2  # the pool's children, inside their sandboxes

    await wait_until(warm, 30, "warm sandboxes")
    tree = parent.children(recursive=True)
    worker.kill()
    await worker.stop()
    _, alive = await asyncio.to_thread(psutil.wait_procs, tree, 10)
    assert alive == [], alive


async def test_worker_refuses_python_execution_without_bubblewrap(tmp_path: Path) -> None:
    # PATH without bwrap stands for a machine where it is not installed.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarm_notebook.cli.main",
        "worker",
        "--signaling",
        "ws://127.0.0.1:9/ws",  # never reached: the check comes first
        "--profile",
        str(tmp_path / "w"),
        *PY_CAPS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PATH": str(tmp_path / "no-bin")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, (out, err)
    message = err.decode()
    assert "bubblewrap" in message and "not installed" in message
    assert "apt-get install bubblewrap" in message and "--unsafe-no-isolation" in message
    assert b"READY" not in out


async def test_unsafe_no_isolation_is_shown_on_the_card(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(
        server.url, "unsafe", str(tmp_path / "w"), *PY_CAPS, "--unsafe-no-isolation"
    )
    c = await join("unsafe", signaling=server.url, profile=tmp_path / "notebook")
    try:
        await wait_until(
            lambda: any(p["isolation"] == "none" for p in c.get_stats()["peers"]), 30, "card"
        )
        result = await run_code(c, "import sys\nsys.flags.isolated")
        assert result["success"] and result["value"] == 1  # still no cwd on sys.path
        assert any("unsafe-no-isolation" in line for line in worker.stderr_lines)
    finally:
        await c.leave()
        assert await worker.stop() == 0


# -- Finding 3, processes and memory, on the pool the worker runs -------------------------

MARK = "4242.4242"  # `sleep MARK` names the processes a task leaves behind


def survivors() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if MARK in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    sandbox = PythonSandboxPool(size=2, memory_limit_mb=512, default_timeout_s=30)
    await sandbox.start()
    yield sandbox
    await sandbox.close()


CTX_A = TaskContext("t-a", "peer-a")
CTX_B = TaskContext("t-b", "peer-b")


async def test_forked_children_are_gone_when_the_task_ends(pool: PythonSandboxPool) -> None:
    code = (
        "import os\n"
        "for _ in range(20):\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {MARK!r}])\n"
        "'forked'"
    )
    result = await pool.run({"code": code}, CTX_A)
    assert result["success"] and decode_value(result["value"]) == "forked"
    assert survivors() == []
    assert pool.stats()["leftover_processes_killed"] >= 20
    again = await pool.run({"code": "6 * 7"}, CTX_A)
    assert decode_value(again["value"]) == 42


async def test_setsid_double_fork_survives_nothing(pool: PythonSandboxPool) -> None:
    code = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {MARK!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "'detached'"
    )
    result = await pool.run({"code": code}, CTX_A)
    assert result["success"], result
    assert survivors() == []
    # Also when the task is killed for its timeout with the daemon running.
    timed = await pool.run({"code": code + "\nwhile True: pass", "timeout": 1.0}, CTX_A)
    assert timed["error_type"] == "timeout"
    assert survivors() == []


async def test_fork_bomb_is_stopped_at_the_process_limit() -> None:
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512, max_processes=16)
    code = (
        "import os, time\n"
        "for _ in range(200):\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/usr/bin/sleep', ['sleep', {MARK!r}])\n"
        "time.sleep(60)\n"
    )
    try:
        result = await sandbox.run({"code": code, "timeout": 30}, CTX_A)
        assert not result["success"]
        # Root is exempt from RLIMIT_NPROC; the pool's own count of the namespace is not.
        expected = {"process-limit"} if os.geteuid() == 0 else {"process-limit", "remote-exception"}
        assert result["error_type"] in expected, result
        assert survivors() == []
        assert (await sandbox.run({"code": "1 + 1"}, CTX_A))["success"]
    finally:
        await sandbox.close()


async def test_shm_and_tmp_are_capped_and_do_not_outlive_the_task(
    pool: PythonSandboxPool,
) -> None:
    cap = pool.tmpfs_mb * 1024 * 1024
    code = (
        "import errno\n"
        "def fill(path):\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        f"            for _ in range({4 * cap} // 1_000_000):\n"
        "                f.write(b'x' * 1_000_000)\n"
        "    except OSError as exc:\n"
        "        return errno.errorcode[exc.errno]\n"
        "    return 'written'\n"
        "(fill('/dev/shm/hog'), fill('/tmp/hog'))"
    )
    result = await pool.run({"code": code}, CTX_A)
    assert result["success"], result
    assert decode_value(result["value"]) == ("ENOSPC", "ENOSPC")
    assert not await asyncio.to_thread(os.path.exists, "/dev/shm/hog")
    listing = "import os\n(os.listdir('/dev/shm'), os.listdir('/tmp'))"
    after = await pool.run({"code": listing}, CTX_A)
    shm_left, tmp_left = decode_value(after["value"])
    assert (shm_left, without_mount_parents(tmp_left)) == ([], [])


async def test_honest_work_keeps_its_limits_inside_the_sandbox(pool: PythonSandboxPool) -> None:
    df = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000)})
    code = (
        "import numpy as np, pandas as pd, pyarrow as pa\n"
        "print('rows', len(df))\n"
        "out = df.assign(c=df.a * 2)\n"
        "pa.Table.from_pandas(out).num_rows"
    )
    result = await pool.run(
        {"code": code, "inputs": {"df": encode_value(df)}, "outputs": ["out"]}, CTX_A
    )
    assert result["success"], result
    assert result["stdout"] == "rows 1000\n" and decode_value(result["value"]) == 1000
    pd.testing.assert_frame_equal(decode_value(result["outputs"]["out"]), df.assign(c=df.a * 2))
    timed = await pool.run({"code": "while True: pass", "timeout": 1.0}, CTX_A)
    assert timed["error_type"] == "timeout"
    grow = "hoard = []\nwhile True:\n    hoard.append(bytearray(10_000_000))\n"
    assert (await pool.run({"code": grow}, CTX_A))["error_type"] == "memory-limit"
    assert pool.stats()["isolation"] == "bubblewrap"


async def test_a_budget_spent_queued_fails_fast_without_killing_a_child(
    pool: PythonSandboxPool,
) -> None:
    before = pool.stats()["pids"]
    spent = await pool.run({"code": "1"}, TaskContext("t-late", "peer-a", timeout_s=0.0))
    assert spent["error_type"] == "timeout" and "queued" in spent["error"]
    assert pool.stats()["pids"] == before and pool.stats()["restarts"] == 0
    assert (await pool.run({"code": "1"}, CTX_A))["success"]


def sandboxes_with(marker: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "bwrap" and marker in " ".join(p.info["cmdline"] or [])
    ]


async def test_closing_while_sandboxes_start_leaves_none_behind() -> None:
    # An unusual limit marks this pool's bwrap command lines: --memory-limit-mb 488.
    sandbox = PythonSandboxPool(size=2, memory_limit_mb=520)
    marker = "--memory-limit-mb 488"
    starting = asyncio.create_task(sandbox.start())
    await wait_until(lambda: len(sandboxes_with(marker)) >= 2, 30, "bwrap started")
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    await sandbox.close()
    await wait_until(lambda: sandboxes_with(marker) == [], 10, "no sandbox left")


# -- Finding 4: one peer's files never reach another peer's task -------------------------


async def test_a_module_planted_by_one_peer_is_not_imported_by_another() -> None:
    # One child: peer B's task must get a fresh sandbox after peer A's.
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512)
    plant = (
        "import os\n"
        "for folder in (os.getcwd(), '/tmp', '/dev/shm'):\n"
        "    with open(os.path.join(folder, 'argparse.py'), 'w') as f:\n"
        "        f.write('PLANTED = True\\n')\n"
        "with open('inputs-of-a.txt', 'w') as f:\n"
        "    f.write(secret)\n"
        "os.getcwd()"
    )
    probe = (
        "import argparse, os, sys\n"
        "found = sorted(os.listdir(os.getcwd()) + os.listdir('/tmp') + os.listdir('/dev/shm'))\n"
        "others = [open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc')"
        " if p.isdigit()]\n"
        "(hasattr(argparse, 'PLANTED'), argparse.__file__, found, b'peer A' in b''.join(others),"
        " '' in sys.path or os.getcwd() in sys.path)"
    )
    try:
        planted = await sandbox.run(
            {"code": plant, "inputs": {"secret": encode_value("peer A's input")}}, CTX_A
        )
        assert planted["success"], planted
        # Even peer A's own next import does not take it: no working directory on sys.path.
        own = await sandbox.run({"code": "import argparse\nhasattr(argparse, 'PLANTED')"}, CTX_A)
        assert decode_value(own["value"]) is False
        seen = await sandbox.run({"code": probe}, CTX_B)
        assert seen["success"], seen
        imported, origin, found, saw_a, cwd_on_path = decode_value(seen["value"])
        assert not imported and "/lib/python" in origin
        assert without_mount_parents(found) == [] and not saw_a and not cwd_on_path
        assert sandbox.stats()["recycled_for_isolation"] == 1
    finally:
        await sandbox.close()
