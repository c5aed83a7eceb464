"""Live output from real workers: what a task prints reaches the notebook while it runs.

One ``swarm-notebook worker`` process behind a real signaling server; the futures API and
``%%swarm run`` in a real IPython shell. Output must arrive in order, before the task
ends, throttled (one batch per 100 ms at most), bounded (cut with a note), and a remote
tqdm must show its updates as they happen.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

import swarm_notebook
from swarm_notebook.client import Coordinator, join
from swarm_notebook.futures import SubmitOptions, map_items
from swarm_notebook.notebook.session import run_blocking
from tests.support.procs import child_processes
from tests.support.shell import joined_shell, wait_until
from tests.support.swarm import Swarm

pytestmark = pytest.mark.timeout(240)

ROOM = "live-output"


def chatty_then_wait(n: int) -> None:
    import sys
    import time

    for i in range(n):
        print("line", i)
        print("err", i, file=sys.stderr)
    while True:  # never ends on its own: the test sees the output, then cancels
        time.sleep(0.02)


def many_lines(n: int) -> int:
    import time

    for i in range(n):
        print(i)
        if i % 1000 == 0:
            time.sleep(0.03)
    return n


def flood() -> int:
    print("x" * 3_000_000)
    return 1


def with_tqdm(n: int) -> int:
    import sys
    import time

    from tqdm import tqdm

    for _ in tqdm(range(n), file=sys.stderr, mininterval=0, ascii=True):
        time.sleep(0.06)
    return n


def square(x: int) -> int:
    return x * x


class Recorder(io.StringIO):
    """A stream that remembers when each write happened."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str]] = []

    def write(self, s: str) -> int:
        self.writes.append((time.monotonic(), s))
        return super().write(s)

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    running = Swarm(tmp_path_factory.mktemp("swarm"), room=ROOM)
    try:
        running.start_worker("w0", "python-execution")
        yield running
    finally:
        running.close()
    assert child_processes() == []


@pytest.fixture(scope="module")
def shell(swarm: Swarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    with joined_shell(ROOM, swarm.url, tmp_path_factory.mktemp("notebook")) as ip:
        yield ip


@pytest.fixture
def c(shell: InteractiveShell) -> Coordinator:
    coordinator = swarm_notebook.current()

    def capable() -> bool:
        peers = coordinator.get_stats()["peers"]
        return any("python-execution" in p["capabilities"] for p in peers)

    wait_until(capable, 30, "a capable worker")
    return coordinator


def test_output_arrives_in_order_while_the_task_runs(c: Coordinator) -> None:
    seen: list[tuple[str, str]] = []
    fut = c.submit(chatty_then_wait, 10, on_output=lambda s, t: seen.append((s, t)))
    expected_out = "".join(f"line {i}\n" for i in range(10))
    expected_err = "".join(f"err {i}\n" for i in range(10))
    # The task never ends by itself, so whatever arrives arrived while it ran.
    wait_until(lambda: fut.stdout == expected_out and fut.stderr == expected_err, 60, "output")
    assert not fut.done() and fut.state == "working"
    assert "".join(t for s, t in seen if s == "stdout") == expected_out
    assert "".join(t for s, t in seen if s == "stderr") == expected_err
    assert fut.cancel()
    assert fut.state == "canceled"


def test_a_tight_loop_is_throttled_and_arrives_complete_and_in_order(c: Coordinator) -> None:
    before = c.get_stats()["output"]["received_batches"]
    seen: list[str] = []
    started = time.monotonic()
    fut = c.submit(many_lines, 30_000, on_output=lambda s, t: seen.append(t))
    assert fut.result(timeout=120) == 30_000
    elapsed = time.monotonic() - started
    expected = "".join(f"{i}\n" for i in range(30_000))
    assert "".join(seen) == expected  # every line, in order, once
    assert fut.stdout == expected
    batches = c.get_stats()["output"]["received_batches"] - before
    assert 2 <= batches <= elapsed / 0.1 + 3, (batches, elapsed)


def test_output_past_the_cap_is_cut_with_a_note(c: Coordinator) -> None:
    seen: list[str] = []
    fut = c.submit(flood, on_output=lambda s, t: seen.append(t))
    assert fut.result(timeout=120) == 1
    assert fut.stdout.endswith("\n[output truncated: 2000001 bytes]\n")
    assert len(fut.stdout) < 1_000_100
    assert "".join(seen) == fut.stdout  # the live text is the final text


def test_a_remote_tqdm_shows_as_it_goes(c: Coordinator) -> None:
    updates: list[tuple[float, str]] = []
    fut = c.submit(with_tqdm, 25, on_output=lambda s, t: updates.append((time.monotonic(), t)))
    assert fut.result(timeout=120) == 25
    states = [(at, int(m)) for at, text in updates for m in re.findall(r"(\d+)/25", text)]
    counts = [n for _, n in states]
    assert counts[-1] == 25 and counts == sorted(counts)
    assert len(set(counts)) >= 4 and len(updates) >= 4  # the bar arrived in pieces
    # ... spread over the task's 1.5 s run, not all at its end
    assert states[-1][0] - states[0][0] > 0.5, states
    assert "\r" in fut.stderr


def test_map_shows_one_bar_with_counts_per_peer(c: Coordinator) -> None:
    bar = FakeBar()
    futures = map_items(c, square, [range(40)], SubmitOptions(), 10, True, bar)
    assert c.gather(futures, timeout=120) == [x * x for x in range(40)]
    wait_until(lambda: bar.closed, 10, "the bar to close")
    assert bar.n == 40
    assert bar.postfix == {"w0": 40}


def test_map_progress_uses_tqdm(c: Coordinator, capsys: pytest.CaptureFixture[str]) -> None:
    futures = c.map(square, range(20), chunksize=5, progress=True)
    assert c.gather(futures, timeout=120) == [x * x for x in range(20)]
    err = capsys.readouterr().err
    assert "20/20" in err and "w0=20" in err


def test_swarm_run_prints_output_in_the_cell_as_it_arrives(
    shell: InteractiveShell, c: Coordinator
) -> None:
    out, err = Recorder(), Recorder()
    cell = (
        "%%swarm run\n"
        "import sys, time\n"
        "from tqdm import tqdm\n"
        "for i in range(3):\n"
        "    print('tick', i, flush=True)\n"
        "    time.sleep(0.4)\n"
        "for _ in tqdm(range(5), file=sys.stderr, mininterval=0, ascii=True):\n"
        "    time.sleep(0.2)\n"
        "'ok'\n"
    )
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = shell.run_cell(cell)
    assert result.error_in_exec is None, result.error_in_exec
    assert result.result == "ok"
    text = out.getvalue()
    assert text.count("tick 0\n") == 1 and text.index("tick 0") < text.index("tick 2")
    first = next(at for at, s in out.writes if "tick 0" in s)
    last = next(at for at, s in out.writes if "tick 2" in s)
    assert last - first > 0.4  # printed as it came, not all at the end
    bar = err.getvalue()
    assert "5/5" in bar and "\r" in bar
    bar_writes = [s for _, s in err.writes if "/5" in s]
    assert len(bar_writes) >= 3  # the bar moved in the cell while the task ran


class FakeBar:
    """Stands in for tqdm where the test reads the bar's state."""

    def __init__(self) -> None:
        self.n = 0
        self.postfix: dict[str, int] = {}
        self.closed = False
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.n += n

    def set_postfix(self, postfix: dict[str, int], refresh: bool = True) -> None:
        self.postfix = dict(postfix)

    def close(self) -> None:
        self.closed = True


def test_only_the_peer_running_a_task_adds_to_its_output(
    c: Coordinator, swarm: Swarm, tmp_path: Path
) -> None:
    forger = run_blocking(join(ROOM, signaling=swarm.url, profile=tmp_path / "forger"))
    try:
        wait_until(lambda: forger.peer_connected(c.peer_id), 30, "the forger's link")
        fut = c.submit(chatty_then_wait, 1)
        wait_until(lambda: fut.stdout == "line 0\n", 60, "the task's own output")

        def send(body: Any) -> None:
            endpoint = forger._core.node.endpoint
            forger._runner.run_sync(endpoint.send(c.peer_id, "task-output", body), timeout=10)

        def rejected(reason: str) -> int:
            return int(c.get_stats()["rejections"].get(reason, 0))

        before = {r: rejected(r) for r in ("not-running-there", "wrong-schema")}
        send({"task_id": fut.task_id, "seq": 1, "chunks": [["stdout", "forged\n"]]})
        send({"task_id": fut.task_id, "seq": 1, "chunks": [["stdin", "x"]]})
        wait_until(
            lambda: (
                rejected("not-running-there") > before["not-running-there"]
                and rejected("wrong-schema") > before["wrong-schema"]
            ),
            30,
            "both forged messages to be refused and counted",
        )
        assert fut.stdout == "line 0\n"
        assert fut.cancel()
    finally:
        run_blocking(forger.leave(), timeout=60)
