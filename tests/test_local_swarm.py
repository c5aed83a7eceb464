"""``swarm_notebook.local()`` / ``%swarm local``: a swarm started from the kernel, stopped with it.

Real parts: the signaling server and the workers are child processes (the workers run
Python in bubblewrap); the test checks the processes themselves, before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

import swarm_notebook
from swarm_notebook.errors import UsageError
from tests.support.procs import child_processes
from tests.support.shell import loaded_shell

pytestmark = pytest.mark.timeout(240)


def cmdlines() -> list[str]:
    return [" ".join(p.cmdline()) for p in child_processes()]


async def test_local_starts_server_and_workers_and_leave_stops_them() -> None:
    assert child_processes() == []
    c = await swarm_notebook.local(workers=2)
    try:
        running = cmdlines()
        assert sum(" worker " in line for line in running) == 2, running
        assert sum(" signal " in line for line in running) == 1, running
        # The secret is made for this swarm and kept out of argv (ps shows argv to everyone).
        assert all("--secret" not in line for line in running)
        assert c.signaling.startswith("ws://127.0.0.1:") and c.room == "local"
        peers = c.peers_frame()
        assert sorted(peers["name"]) == ["local-worker-1", "local-worker-2"]
        results = await asyncio.gather(
            *(c.delegate_task("python-computation", {"code": "6 * 7"}) for _ in range(6))
        )
        assert all(r["success"] and r["value"] == 42 for r in results)
    finally:
        await c.leave()
    assert child_processes() == []


def test_local_refuses_a_bad_worker_count() -> None:
    with pytest.raises(UsageError) as err:
        asyncio.run(swarm_notebook.local(workers=-1))
    assert err.value.reason == "bad-arguments"
    assert child_processes() == []


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    with loaded_shell() as ip:
        yield ip


def test_swarm_local_magic_then_run_then_leave(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%swarm local 1")
    assert result.error_in_exec is None, result.error_in_exec
    out = capsys.readouterr().out
    assert "joined room 'local'" in out and "local-worker-1" in out
    ran = shell.run_cell("%%swarm run\nsum(range(10))")
    assert ran.error_in_exec is None and ran.result == 45
    again = shell.run_cell("%swarm local 1")  # one swarm per session, said clearly
    assert isinstance(again.error_in_exec, UsageError)
    assert again.error_in_exec.reason == "already-joined"
    assert shell.run_cell("%swarm leave").error_in_exec is None
    assert child_processes() == []


KERNEL = """
import asyncio, json, os, sys
import swarm_notebook

async def main():
    c = await swarm_notebook.local(workers=1)
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.Event().wait()  # until killed, like a kernel

asyncio.run(main())
"""


async def test_children_do_not_outlive_a_killed_kernel() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KERNEL, stdout=asyncio.subprocess.PIPE, env={**os.environ}
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 180)
    assert json.loads(line) == {"ready": True}
    kids = psutil.Process(proc.pid).children(recursive=True)
    assert any("signal" in p.cmdline() for p in kids) and any("worker" in p.cmdline() for p in kids)
    proc.send_signal(signal.SIGKILL)  # no atexit, no leave: only --exit-with-parent is left
    await proc.wait()
    _, alive = await asyncio.to_thread(psutil.wait_procs, kids, 60)
    assert alive == [], [p.cmdline() for p in alive]
