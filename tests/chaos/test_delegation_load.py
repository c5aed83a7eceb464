"""Delegation under load and chaos: real worker processes, a real signaling server.

* 6 peers (this process delegates, 5 ``swarm-notebook worker`` processes run the code),
  thousands of ``python-computation`` tasks, 2 workers SIGKILLed mid-run: every task ends
  exactly once, completed or failed with an explicit error.
* The signaling server is killed and restarted on the same port during a load run: peer
  links stay up, no task fails, and every peer registers again with the new server.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import DelegationError
from swarm_notebook.signaling import SignalingConfig, SignalingServer
from tests.chaos.helpers import TerminalEvents, wait_until
from tests.support.procs import WorkerProcess, child_processes

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

TASKS = int(os.environ.get("SWARM_CHAOS_TASKS", "5000"))
# Tasks kept in flight by the notebook side: more than the workers' combined concurrency,
# so every worker also holds a queue of tasks a kill can hit.
WINDOW = int(os.environ.get("SWARM_CHAOS_WINDOW", "96"))
SLOW_EVERY = 100  # every 100th task sleeps, so a kill can catch a task mid-execution
SLOW_SECONDS = 1.0
PY_CAPS = ("--caps", "python-execution")


def task_code(i: int) -> str:
    if i % SLOW_EVERY == SLOW_EVERY - 1:
        return f"import time\ntime.sleep({SLOW_SECONDS})\n{i} + 1"
    return f"{i} + 1"


@dataclass
class LoadRun:
    """Outcome of one load run: results by task index, and refusals raised to the caller."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, DelegationError] = field(default_factory=dict)
    completed: int = 0
    seconds: float = 0.0


async def run_load(
    c: Coordinator,
    n: int,
    *,
    window: int = WINDOW,
    at_progress: dict[int, Callable[[], Coroutine[Any, Any, None]]] | None = None,
) -> LoadRun:
    """Delegate ``n`` tasks with at most ``window`` outstanding; run ``at_progress[k]``
    (chaos) once ``k`` tasks have ended."""
    run = LoadRun()
    slots = asyncio.Semaphore(window)
    hooks = dict(at_progress or {})
    hook_tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        try:
            run.results[i] = await c.delegate_task(
                "python-computation", {"code": task_code(i)}, timeout=60
            )
        except DelegationError as exc:
            run.errors[i] = exc
        finally:
            run.completed += 1
            slots.release()
            hook = hooks.pop(run.completed, None)
            if hook is not None:
                hook_tasks.append(asyncio.create_task(hook()))

    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for i in range(n):
            await slots.acquire()
            group.create_task(one(i))
    await asyncio.gather(*hook_tasks)
    run.seconds = time.monotonic() - started
    return run


async def start_workers(url: str, room: str, tmp: Path, n: int) -> list[WorkerProcess]:
    return list(
        await asyncio.gather(
            *(
                WorkerProcess.start(url, room, str(tmp / f"w{i}"), *PY_CAPS, name=f"w{i}")
                for i in range(n)
            )
        )
    )


async def capable_peers(c: Coordinator, n: int) -> None:
    def ready() -> bool:
        peers = c.get_stats()["peers"]
        capable = [p for p in peers if "python-execution" in p["capabilities"]]
        return sum(1 for p in capable if p["state"] == "connected") >= n

    await wait_until(ready, 60, f"{n} peers offering python-execution")


async def stop_workers(workers: list[WorkerProcess]) -> None:
    codes = await asyncio.gather(*(w.stop() for w in workers))
    for w, code in zip(workers, codes, strict=True):
        if code != -9:
            assert code == 0, f"{w.name} exited {code}: {''.join(w.stderr_lines[-20:])}"
            assert w.problems() == [], w.problems()


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_exactly_once(run: LoadRun, events: TerminalEvents, n: int) -> Counter[str]:
    """Every task ends exactly once, as the caller saw it and as the events say."""
    assert len(run.results) + len(run.errors) == n, "a delegate_task call never returned"
    assert set(run.results).isdisjoint(run.errors)
    assert len(events.submitted) == n and set(events.submitted.values()) == {1}
    assert set(events.by_id) == set(events.submitted), "a submitted task has no terminal event"
    duplicated = {tid: k for tid, k in events.by_id.items() if k != 1}
    assert duplicated == {}, f"tasks reported more than once: {duplicated}"
    returned_ids = [r["task_id"] for r in run.results.values()]
    assert len(set(returned_ids)) == len(returned_ids), "one task id answered two calls"
    for i, result in run.results.items():
        state = events.states[result["task_id"]][0]
        if result["success"]:
            assert state == "completed" and result["value"] == i + 1, (i, result)
        else:
            assert state == "failed" and result["error"] and result["error_type"], result
    # Calls that raised account for exactly the terminal events no result carried.
    unreturned = set(events.by_id) - set(returned_ids)
    assert len(unreturned) == len(run.errors)
    for tid in unreturned:
        assert events.states[tid][0] in ("failed", "rejected") and events.errors[tid], tid
    for exc in run.errors.values():
        assert exc.reason and str(exc), exc
    return Counter(states[0] for states in events.states.values())


async def test_5000_tasks_two_workers_killed_every_task_ends_exactly_once(
    server: SignalingServer, tmp_path: Path
) -> None:
    workers = await start_workers(server.url, "chaos-load", tmp_path, 5)
    by_id = {w.peer_id: w for w in workers}
    c = await join("chaos-load", signaling=server.url, profile=tmp_path / "me")
    events = TerminalEvents(c)
    killed: list[dict[str, Any]] = []

    def executing_slow_task() -> dict[str, Any] | None:
        """A task that has been running on a live worker for a while (a slow one)."""
        now = time.monotonic()
        for working in reversed(events.working):
            tid = working["id"]
            if (
                tid not in events.ended_at
                and now - events.working_at[tid] > SLOW_SECONDS / 4
                and by_id[working["peer"]].proc.returncode is None
            ):
                return working
        return None

    async def kill_mid_task() -> None:
        await wait_until(lambda: executing_slow_task() is not None, 30, "a slow task running")
        running = executing_slow_task()
        assert running is not None
        peer = running["peer"]
        victim = by_id[peer]
        sandboxes = [p.pid for p in psutil.Process(victim.proc.pid).children(recursive=True)]
        victim.kill()  # at once: the slow task must still be running when the worker dies
        # The delegator needs seconds to notice the death, so its records still show what
        # it had counted on that worker.
        open_records = [
            r
            for r in c.task_records()
            if r["role"] == "delegated" and r["state"] in ("submitted", "working")
        ]
        ids = [r["id"] for r in open_records if r["peer"] == peer]
        killed.append({"peer": peer, "running": running["id"], "ids": ids, "sandboxes": sandboxes})

    try:
        await capable_peers(c, 5)
        run = await run_load(
            c, TASKS, at_progress={TASKS // 3: kill_mid_task, 2 * TASKS // 3: kill_mid_task}
        )
        await wait_until(lambda: events.total >= TASKS, 10, "every terminal event")
        states = assert_exactly_once(run, events, TASKS)
        stats = c.get_stats()
        assert stats["total_tasks"] == TASKS
        assert stats["tasks_completed"] + stats["tasks_failed"] + stats["tasks_canceled"] == TASKS
        assert stats["tasks_completed"] == states["completed"]

        # Each kill hit a task mid-execution; it ended exactly once, on another worker.
        dead = {k["peer"] for k in killed}
        assert len(dead) == 2
        by_task = {r["task_id"]: r for r in run.results.values()}
        for kill in killed:
            assert events.by_id[kill["running"]] == 1
            rerun = by_task[kill["running"]]
            assert rerun["success"] and rerun["attempts"] >= 2 and rerun["peer"] not in dead
        # Everything else the delegator still counted on a killed worker ended exactly once
        # too: either its answer was already on the wire, or it ran again elsewhere.
        in_flight = [tid for kill in killed for tid in kill["ids"]]
        assert all(events.by_id[tid] == 1 for tid in in_flight)
        moved = sum(1 for tid in in_flight if tid in by_task and by_task[tid]["peer"] not in dead)
        failed_over = sum(1 for r in run.results.values() if r["attempts"] >= 2)
        # A killed worker's sandbox children notice and exit on their own.
        orphans = [pid for kill in killed for pid in kill["sandboxes"]]
        await wait_until(lambda: not any(map(running, orphans)), 15, "orphaned sandboxes to exit")
        attempts = Counter(r["attempts"] for r in run.results.values())
        print(
            f"\n[chaos] {TASKS} tasks over 5 workers (2 SIGKILLed) in {run.seconds:.1f} s "
            f"({TASKS / run.seconds:.0f} tasks/s): ended {dict(states)}, "
            f"raised {len(run.errors)}, terminal events {events.total}, duplicates 0, lost 0; "
            f"in flight on the killed workers at the kill {len(in_flight)} "
            f"(re-run elsewhere {moved}), "
            f"failed over {failed_over}; attempts {dict(sorted(attempts.items()))}"
        )
    finally:
        events.close()
        await c.leave()
        await stop_workers(workers)
    assert child_processes() == []


async def test_signaling_restart_under_load_keeps_links_and_tasks(tmp_path: Path) -> None:
    first = SignalingServer(SignalingConfig(port=0))
    port = await first.start()
    servers = [first]
    workers = await start_workers(first.url, "chaos-restart", tmp_path, 5)
    c = await join("chaos-restart", signaling=first.url, profile=tmp_path / "me")
    events = TerminalEvents(c)
    peer_changes: list[tuple[str, str]] = []
    c.on("swarm:peer-left", lambda p: peer_changes.append(("left", p["peer_id"])))
    outage: dict[str, float] = {}

    async def stop_server() -> None:
        outage["stopped"] = time.monotonic()
        await first.close()  # every client gets Shutdown and loses its socket

    async def restart_server() -> None:
        second = SignalingServer(SignalingConfig(port=port))
        await second.start()
        servers.append(second)
        outage["restarted"] = time.monotonic()

    n = max(2000, TASKS // 2)
    try:
        await capable_peers(c, 5)
        assert first.stats()["peers"] == 6
        links_before = c._core.node.transport.stats()["links_lost"]
        run = await run_load(c, n, at_progress={n // 4: stop_server, 3 * n // 5: restart_server})
        await wait_until(lambda: events.total >= n, 10, "every terminal event")
        states = assert_exactly_once(run, events, n)
        # No task failed, not even one that was in flight during the outage.
        assert run.errors == {} and states == Counter({"completed": n}), states
        assert len(servers) == 2
        second = servers[1]
        # Every peer registers with the new server on its own.
        reregistered = time.monotonic()
        await wait_until(lambda: second.stats()["peers"] == 6, 30, "6 peers in the new server")
        reregistered = time.monotonic() - reregistered
        transport_stats = c._core.node.transport.stats()
        assert transport_stats["links_lost"] == links_before, transport_stats
        during = sum(
            1 for t in events.ended_at.values() if outage["stopped"] < t < outage["restarted"]
        )
        assert during > 0, "no task finished while the server was down"
        assert peer_changes == []
        assert c.get_stats()["connected_peers"] == 5
        signaling = c._core.node.transport._signaling.stats()  # type: ignore[attr-defined]
        assert signaling["shutdowns_received"] == 1 and signaling["reconnects"] == 1, signaling
        # The room still works end to end after the restart.
        after = await c.delegate_task("python-computation", {"code": "6 * 7"})
        assert after["success"] and after["value"] == 42
        print(
            f"\n[chaos] signaling server stopped and restarted during {n} tasks: down "
            f"{outage['restarted'] - outage['stopped']:.2f} s ({during} tasks finished meanwhile), "
            f"all {n} completed in {run.seconds:.1f} s, links lost 0, peers re-registered "
            f"{second.stats()['peers']} (joins {second.stats()['joins_total']}; "
            f"{reregistered:.1f} s after the load ended)"
        )
    finally:
        events.close()
        await c.leave()
        await stop_workers(workers)
        for srv in servers:
            await srv.close()
    assert child_processes() == []


async def test_thousands_gathered_at_once_all_complete(tmp_path: Path) -> None:
    """The notebook pattern ``gather(*(delegate_task(...) for ...))`` with far more tasks
    than the workers' capacity: every task waits its turn and completes."""
    server = SignalingServer(SignalingConfig(port=0))
    await server.start()
    workers = list(
        await asyncio.gather(
            *(
                WorkerProcess.start(
                    server.url, "gather", str(tmp_path / f"w{i}"), *PY_CAPS, name=f"w{i}"
                )
                for i in range(2)
            )
        )
    )
    c = await join("gather", signaling=server.url, profile=tmp_path / "me")
    try:
        await wait_until(
            lambda: (
                sum(1 for p in c.get_stats()["peers"] if "python-execution" in p["capabilities"])
                == 2
            ),
            30,
            "two workers",
        )
        n = 3000
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                c.delegate_task("python-computation", {"code": f"{i} * 3"}, timeout=300)
                for i in range(n)
            )
        )
        seconds = time.perf_counter() - started
        assert [r["value"] for r in results] == [i * 3 for i in range(n)]
        per_peer = Counter(r["peer"] for r in results)
        print(
            f"\n{n} gathered at once: {seconds:.2f} s ({n / seconds:.0f} tasks/s), {dict(per_peer)}"
        )
        stats = c.get_stats()
        assert stats["tasks_completed"] == n and stats["tasks_failed"] == 0
    finally:
        await c.leave()
        await asyncio.gather(*(w.stop() for w in workers))
        await server.close()
    assert child_processes() == []
