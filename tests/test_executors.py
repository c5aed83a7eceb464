"""Task executors on real parts: sandbox child processes, files, a dulwich repo, HTTP.

The only stand-in is the LLM endpoint (tests/support/openai_standin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from dulwich import porcelain

from swarm_notebook.errors import UnknownTaskTypeError
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.workload.executors import (
    REQUIREMENTS,
    CodeGenerationExecutor,
    ExecutorConfig,
    FileAnalysisExecutor,
    GitOperationExecutor,
    TaskContext,
    TaskRefused,
    build_executors,
    close_executors,
    detect_capabilities,
    requirements_for_task_type,
    run_executor,
)
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from tests.support.openai_standin import STANDIN_MODEL, OpenAIStandin, standin_reply

CTX = TaskContext(task_id="t-1", delegator="peer-a")


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition the pool reaches asynchronously (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# Inside a sandbox every child is pid 2 of its own namespace: this names the process instead.
PROCESS_TOKEN = (
    "__import__('builtins').__dict__.setdefault('token', __import__('os').urandom(8).hex())"
)


def sandbox_pids(pool: PythonSandboxPool) -> list[int]:
    return list(pool.stats()["pids"])


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    sandbox = PythonSandboxPool(size=2, memory_limit_mb=512, default_timeout_s=20)
    await sandbox.start()
    yield sandbox
    await sandbox.close()


# -- python-computation -------------------------------------------------------------


async def test_stdout_stderr_last_value_and_outputs(pool: PythonSandboxPool) -> None:
    code = (
        "import sys\n"
        "print('hello', n)\n"
        "print('careful', file=sys.stderr)\n"
        "import pandas as pd\n"
        "frame = pd.DataFrame({'v': [n, n + 1]})\n"
        "total = int(frame.v.sum())\n"
        "frame.v.max() * 2\n"
    )
    result = await pool.run(
        {"code": code, "inputs": {"n": encode_value(20)}, "outputs": ["total", "frame"]}, CTX
    )
    assert result["success"], result
    assert result["stdout"] == "hello 20\n"
    assert result["stderr"] == "careful\n"
    assert decode_value(result["value"]) == 42
    assert decode_value(result["outputs"]["total"]) == 41
    pd.testing.assert_frame_equal(
        decode_value(result["outputs"]["frame"]), pd.DataFrame({"v": [20, 21]})
    )
    statement_only = await pool.run({"code": "x = 1"}, CTX)
    assert statement_only["success"] and statement_only["value"] is None


async def test_megabyte_dataframe_input_round_trips_intact(pool: PythonSandboxPool) -> None:
    n = 25_000
    rng = np.random.default_rng(7)
    df = pd.DataFrame(
        {
            "i": rng.integers(0, 1000, n, dtype="int32"),
            "x": rng.random(n),
            "label": [f"label-{k % 97}" for k in range(n)],
            "kind": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "at": pd.date_range("2024-01-01", periods=n, freq="min", tz="America/New_York"),
            "maybe": pd.array([None if r < 0.1 else 1 for r in rng.random(n)], dtype="Int64"),
        },
        index=pd.Index(np.arange(n) * 3, name="row_id"),
    )
    encoded = encode_value(df)
    assert len(encoded["data"]) > 1_000_000
    code = "described = {c: str(t) for c, t in df.dtypes.items()}\nsame = df\ndescribed"
    result = await pool.run({"code": code, "inputs": {"df": encoded}, "outputs": ["same"]}, CTX)
    assert result["success"], result
    assert decode_value(result["value"]) == {c: str(t) for c, t in df.dtypes.items()}
    pd.testing.assert_frame_equal(decode_value(result["outputs"]["same"]), df)


async def test_remote_exception_traceback_shows_cell_lines(pool: PythonSandboxPool) -> None:
    code = "a = 1\nb = 0\n\ndef ratio():\n    return a / b\n\nratio()\n"
    result = await pool.run({"code": code}, CTX)
    assert not result["success"]
    assert result["error_type"] == "remote-exception"
    assert result["error"] == "ZeroDivisionError: division by zero"
    tb = result["traceback"]
    assert 'File "<remote-cell>", line 5, in ratio' in tb
    assert "return a / b" in tb
    assert 'File "<remote-cell>", line 7' in tb
    assert "sandbox/child.py" not in tb  # the runner's frames are not the user's business
    syntax = await pool.run({"code": "x = (1,\n"}, CTX)
    assert syntax["error_type"] == "syntax-error"
    assert "SyntaxError" in syntax["error"]


async def test_timeout_kills_and_replaces_the_child(pool: PythonSandboxPool) -> None:
    before = set(sandbox_pids(pool))
    started = time.monotonic()
    result = await pool.run({"code": "while True:\n    pass", "timeout": 1.0}, CTX)
    assert result["error_type"] == "timeout", result
    assert time.monotonic() - started < 5
    after = await pool.run({"code": "import os\nos.getpid()"}, CTX)
    assert after["success"]
    await eventually(lambda: pool.stats()["restarts"] >= 1)
    assert len(set(sandbox_pids(pool)) - before) == 1
    assert pool.stats()["timeouts"] == 1


async def test_timeout_also_kills_processes_the_task_started(pool: PythonSandboxPool) -> None:
    code = "import subprocess\nsubprocess.Popen(['sleep', '1000'])\nwhile True:\n    pass\n"
    running = asyncio.create_task(pool.run({"code": code, "timeout": 1.0}, CTX))
    grandchildren: list[psutil.Process] = []

    def spawned() -> bool:
        for pid in sandbox_pids(pool):
            with contextlib.suppress(psutil.Error):
                grandchildren.extend(psutil.Process(pid).children())
        return bool(grandchildren)

    await eventually(spawned)
    assert (await running)["error_type"] == "timeout"
    await asyncio.to_thread(_wait_gone, grandchildren[0].pid)


async def test_memory_limit_ends_task_and_pool_keeps_serving(pool: PythonSandboxPool) -> None:
    grow = "hoard = []\nwhile True:\n    hoard.append(bytearray(10_000_000))\n"
    result = await pool.run({"code": grow}, CTX)
    assert not result["success"]
    assert result["error_type"] == "memory-limit", result
    follow_up = await pool.run({"code": "sum(range(10))"}, CTX)
    assert follow_up["success"] and decode_value(follow_up["value"]) == 45
    # Shared memory escapes RLIMIT_DATA; the parent's RSS watchdog catches it.
    shared = (
        "import mmap\n"
        "m = mmap.mmap(-1, 4 * 1024**3)\n"
        "for i in range(0, len(m), 4096):\n"
        "    m[i] = 1\n"
    )
    result = await pool.run({"code": shared, "timeout": 30}, CTX)
    assert result["error_type"] == "memory-limit", result
    assert (await pool.run({"code": "1"}, CTX))["success"]
    assert pool.stats()["memory_kills"] == 2


async def test_child_killed_from_outside_is_replaced(pool: PythonSandboxPool) -> None:
    victim = sandbox_pids(pool)[0]
    os.kill(victim, signal.SIGKILL)
    # Wait until the kernel has the child gone (reaped by asyncio's child watcher).
    await asyncio.to_thread(_wait_gone, victim)
    for _ in range(3):
        result = await pool.run({"code": "6 * 7"}, CTX)
        assert result["success"], result
    await eventually(lambda: pool.stats()["restarts"] >= 1 and len(sandbox_pids(pool)) == 2)
    assert victim not in sandbox_pids(pool)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still exists")
        time.sleep(0.01)


async def test_missing_package_and_bad_input_are_clear(pool: PythonSandboxPool) -> None:
    result = await pool.run({"code": "1", "packages": ["numpy", "no_such_pkg_for_swarm"]}, CTX)
    assert result["error_type"] == "missing-package"
    assert "no_such_pkg_for_swarm" in result["error"] and "never install" in result["error"]
    assert "numpy" not in result["error"].split(":")[1]
    with pytest.raises(TaskRefused) as info:
        await pool.run({"code": "1", "unexpected": True}, CTX)
    assert info.value.reason == "bad-input"
    with pytest.raises(TaskRefused):
        await pool.run({"code": "1", "outputs": ["not valid"]}, CTX)
    missing = await pool.run({"code": "x = 1", "outputs": ["y"]}, CTX)
    assert missing["error_type"] == "missing-output" and "y" in missing["error"]
    with pytest.raises(TaskRefused) as via_dispatch:  # the one path lets refusals through
        await run_executor(pool, {}, CTX)
    assert via_dispatch.value.reason == "bad-input"


async def test_output_is_bounded_and_unencodable_values_are_explained(
    pool: PythonSandboxPool,
) -> None:
    result = await pool.run({"code": "print('x' * 3_000_000)"}, CTX)
    assert result["success"]
    assert len(result["stdout"]) < 1_100_000
    assert "output truncated" in result["stdout"]
    odd = await pool.run({"code": "import decimal\ndecimal.Decimal('1.5')"}, CTX)
    assert odd["success"] and odd["value"] is None
    assert "decimal.Decimal" in odd["value_error"] and odd["value_repr"] == "Decimal('1.5')"


async def test_output_streams_live_and_a_lone_surrogate_is_escaped_not_a_crash(
    pool: PythonSandboxPool,
) -> None:
    got: list[list[tuple[str, str]]] = []
    ctx = TaskContext(task_id="t-live", delegator="peer-a", on_output=got.append)
    code = "import sys\nprint('a\\ud800b')\nprint('e', file=sys.stderr)\n1"
    result = await pool.run({"code": code}, ctx)
    assert result["success"], result
    assert result["stdout"] == "a\\ud800b\n" and result["stderr"] == "e\n"
    streamed = [chunk for batch in got for chunk in batch]
    for stream in ("stdout", "stderr"):
        assert "".join(t for s, t in streamed if s == stream) == result[stream]
    kinds = [s for s, _ in streamed]
    assert "stdout" not in kinds[kinds.index("stderr") :]  # in the order it was printed


async def test_pool_runs_size_tasks_at_once_and_bounds_the_queue() -> None:
    sandbox = PythonSandboxPool(size=2, memory_limit_mb=512, max_queue=1)
    await sandbox.start()
    # The sandbox has no network: the test releases the tasks with a file it puts into
    # each child's working directory through /proc/<pid>/cwd.
    blocker = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.005)\n'go'\n"
    try:
        running = [asyncio.create_task(sandbox.run({"code": blocker}, CTX)) for _ in range(2)]
        await eventually(lambda: sandbox.stats()["busy"] == 2)  # both run at once
        queued = asyncio.create_task(sandbox.run({"code": "'third'"}, CTX))
        await eventually(lambda: sandbox.stats()["queued"] == 1)
        with pytest.raises(TaskRefused) as info:
            await sandbox.run({"code": "'fourth'"}, CTX)
        assert info.value.reason == "busy"
        for pid in sandbox_pids(sandbox):
            await asyncio.to_thread(Path(f"/proc/{pid}/cwd/go").write_text, "", "utf-8")
        results = await asyncio.gather(*running, queued)
        assert [decode_value(r["value"]) for r in results] == ["go", "go", "third"]
    finally:
        await sandbox.close()


async def test_max_tasks_per_worker_gives_each_task_a_fresh_process() -> None:
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512, max_tasks_per_worker=1)
    try:
        first = await sandbox.run({"code": PROCESS_TOKEN}, CTX)
        second = await sandbox.run({"code": PROCESS_TOKEN}, CTX)
        assert decode_value(first["value"]) != decode_value(second["value"])
    finally:
        await sandbox.close()


async def test_close_leaves_no_child_processes() -> None:
    sandbox = PythonSandboxPool(size=2, memory_limit_mb=512)
    await sandbox.start()
    pids = sandbox_pids(sandbox)
    assert len(pids) == 2
    me = psutil.Process()
    assert set(pids) <= {c.pid for c in me.children(recursive=True)}
    await sandbox.close()
    remaining = {c.pid for c in me.children(recursive=True)}
    assert not set(pids) & remaining
    assert not any(psutil.pid_exists(p) for p in pids)  # reaped, not zombies


async def test_warm_round_trip_overhead_is_small(pool: PythonSandboxPool) -> None:
    for _ in range(20):
        await pool.run({"code": "1+1"}, CTX)
    samples = []
    for _ in range(200):
        started = time.perf_counter()
        result = await pool.run({"code": "1+1"}, CTX)
        samples.append(time.perf_counter() - started)
    assert decode_value(result["value"]) == 2
    median_ms = statistics.median(samples) * 1000
    print(f"warm 1+1 round trip: median {median_ms:.3f} ms over {len(samples)} runs")
    assert median_ms < 2.0  # measured ~0.1 ms; generous for a shared 2-core machine


# -- file-analysis -----------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "notes.md").write_text("# title\nline two\nline three\n", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("outside", encoding="utf-8")
    (ws / "escape").symlink_to(tmp_path / "secret.txt")
    (ws / "inner-link").symlink_to(ws / "data" / "notes.md")
    return ws


async def test_file_analysis_of_a_workspace_file(workspace: Path) -> None:
    executor = FileAnalysisExecutor(workspace)
    result = await executor.run({"path": "data/notes.md"}, CTX)
    assert result["success"], result
    analysis = result["analysis"]
    content = (workspace / "data" / "notes.md").read_bytes()
    assert analysis["length"] == len(content.decode())
    assert analysis["lines"] == 4  # the blueprint counts split('\n') pieces
    assert analysis["type"] == "md"
    assert analysis["size_bytes"] == len(content)
    assert analysis["sha256"] == hashlib.sha256(content).hexdigest()
    via_link = await executor.run({"path": "inner-link"}, CTX)
    assert via_link["success"] and via_link["analysis"]["sha256"] == analysis["sha256"]


@pytest.mark.parametrize(
    "path", ["../secret.txt", "/etc/passwd", "escape", "data/../../secret.txt", "~/x"]
)
async def test_file_analysis_refuses_paths_outside(workspace: Path, path: str) -> None:
    result = await FileAnalysisExecutor(workspace).run({"path": path}, CTX)
    assert not result["success"]
    assert result["error_type"] == "path-outside-workspace"


async def test_file_analysis_refuses_a_hard_link_to_a_file_outside(
    workspace: Path, tmp_path: Path
) -> None:
    # Finding 10: a hard link planted in the workspace let file-analysis hash a file
    # outside it (a hard link resolves to itself; no path check can see through it).
    os.link(tmp_path / "secret.txt", workspace / "data" / "planted.txt")
    executor = FileAnalysisExecutor(workspace)
    result = await executor.run({"path": "data/planted.txt"}, CTX)
    assert not result["success"] and result["error_type"] == "path-outside-workspace"
    assert "hard links" in result["error"] and "sha256" not in str(result)
    assert (await executor.run({"path": "data/notes.md"}, CTX))["success"]


async def test_file_analysis_missing_large_and_non_files(workspace: Path) -> None:
    executor = FileAnalysisExecutor(workspace, max_bytes=100)
    missing = await executor.run({"path": "data/none.txt"}, CTX)
    assert missing["error_type"] == "not-found"
    (workspace / "big.bin").write_bytes(b"\x00" * 101)
    assert (await executor.run({"path": "big.bin"}, CTX))["error_type"] == "too-large"
    os.mkfifo(workspace / "pipe")
    assert (await executor.run({"path": "pipe"}, CTX))["error_type"] == "bad-input"
    assert (await executor.run({"path": "data"}, CTX))["error_type"] == "bad-input"


# -- git-operation -----------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    porcelain.init(str(path))
    who = b"Ada <ada@example.org>"
    (path / "a.txt").write_text("one\n")
    porcelain.add(str(path), [str(path / "a.txt")])
    porcelain.commit(str(path), message=b"first", author=who, committer=who)
    (path / "a.txt").write_text("one\ntwo\n")
    (path / "b.txt").write_text("bee\n")
    porcelain.add(str(path), [str(path / "a.txt"), str(path / "b.txt")])
    porcelain.commit(str(path), message=b"second: add b", author=who, committer=who)
    (path / "a.txt").write_text("one\ntwo\nthree\n")  # unstaged change
    (path / "new.txt").write_text("untracked\n")
    return path


async def test_git_log_status_diff_show(repo: Path) -> None:
    git = GitOperationExecutor(repo)
    log = await git.run({"op": "log", "max_count": 5}, CTX)
    assert log["success"], log
    assert [c["message"] for c in log["commits"]] == ["second: add b", "first"]
    assert log["commits"][0]["author"] == "Ada <ada@example.org>"
    first_id = log["commits"][1]["id"]

    status = await git.run({"op": "status"}, CTX)
    assert status["unstaged"] == ["a.txt"]
    assert status["untracked"] == ["new.txt"]

    diff = await git.run({"op": "diff", "base": first_id, "target": "HEAD"}, CTX)
    assert "+two" in diff["patch"] and "+bee" in diff["patch"]
    assert "three" not in diff["patch"]

    show = await git.run({"op": "show", "commit": first_id[:10]}, CTX)
    assert show["commit"]["id"] == first_id
    assert "+one" in show["patch"]

    bounded = GitOperationExecutor(repo, max_output_bytes=40)
    cut = await bounded.run({"op": "show"}, CTX)
    assert cut["truncated"] and "diff truncated" in cut["patch"]

    unknown = await git.run({"op": "show", "commit": "0" * 40}, CTX)
    assert unknown["error_type"] == "not-found"
    with pytest.raises(TaskRefused):
        await git.run({"op": "log", "ref": "--all"}, CTX)


async def test_git_write_ops_are_refused(repo: Path) -> None:
    refs_before = (repo / ".git" / "refs" / "heads").iterdir()
    snapshot = {p.name: p.read_bytes() for p in refs_before}
    for allow in (False, True):
        git = GitOperationExecutor(repo, allow_write=allow)
        result = await git.run({"op": "commit", "message": "sneaky"}, CTX)
        assert result["error_type"] == "write-refused"
        assert "commit" in result["error"]
    after = {p.name: p.read_bytes() for p in (repo / ".git" / "refs" / "heads").iterdir()}
    assert after == snapshot
    with pytest.raises(TaskRefused):
        await GitOperationExecutor(repo).run({"op": "frobnicate"}, CTX)


# -- code-generation and capabilities ----------------------------------------------


@pytest.fixture
async def llm() -> AsyncIterator[OpenAIStandin]:
    async with OpenAIStandin() as standin:
        yield standin


async def test_code_generation_against_the_standin(llm: OpenAIStandin) -> None:
    executor = CodeGenerationExecutor(llm.url + "/v1", STANDIN_MODEL, timeout=10)
    try:
        prompt = "write a function that returns the prompt length"
        result = await executor.run({"prompt": prompt, "temperature": 0.2}, CTX)
        assert result == {
            "success": True,
            "code": standin_reply(prompt),
            "provider": f"{STANDIN_MODEL}@{llm.url}",
        }
        assert llm.requests[-1]["temperature"] == 0.2
        assert llm.requests[-1]["max_tokens"] == 2048
        for marker, error_type in [
            ("[standin:http-500]", "llm-bad-response"),
            ("[standin:malformed]", "llm-bad-response"),
            ("[standin:no-content]", "llm-bad-response"),
        ]:
            failed = await executor.run({"prompt": marker}, CTX)
            assert failed["error_type"] == error_type, failed
            assert llm.url in failed["error"]
        hung = await executor.run(
            {"prompt": "[standin:hang]"}, TaskContext("t-2", "peer-a", timeout_s=0.5)
        )
        assert hung["error_type"] == "timeout"
        with pytest.raises(TaskRefused):
            await executor.run({"prompt": "x", "temperature": 9}, CTX)
    finally:
        await executor.close()


async def test_code_generation_discovers_the_model_when_none_given(llm: OpenAIStandin) -> None:
    executor = CodeGenerationExecutor(llm.url, None, timeout=10)
    try:
        result = await executor.run({"prompt": "hi"}, CTX)
        assert result["provider"].startswith(STANDIN_MODEL)
    finally:
        await executor.close()


async def test_code_generation_with_endpoint_down_is_a_clear_error() -> None:
    standin = OpenAIStandin()
    url = await standin.start()
    await standin.stop()  # the port is closed now
    executor = CodeGenerationExecutor(url, STANDIN_MODEL, timeout=5)
    try:
        result = await executor.run({"prompt": "anything"}, CTX)
    finally:
        await executor.close()
    assert result["error_type"] == "llm-unavailable"
    assert "cannot reach" in result["error"] and url in result["error"]


async def test_capabilities_follow_config_and_a_live_llm(
    llm: OpenAIStandin, workspace: Path, repo: Path, tmp_path: Path
) -> None:
    config = ExecutorConfig(
        python_execution=True, workspace=workspace, git_repo=repo, llm_endpoint=llm.url
    )
    caps = await detect_capabilities(config)
    assert caps == [
        "python-execution",
        "file-management",
        "git-vfs",
        "local-llm",
        "code-generation",
    ]
    executors = build_executors(config, caps)
    try:
        assert set(executors) == set(REQUIREMENTS)
        for task_type, executor in executors.items():
            assert executor.task_type == task_type
    finally:
        await close_executors(executors)

    wrong_model = ExecutorConfig(llm_endpoint=llm.url, llm_model="other")
    assert await detect_capabilities(wrong_model) == []

    await llm.stop()
    down = await detect_capabilities(config)
    assert "local-llm" not in down and "code-generation" not in down
    assert set(build_executors(config, down)) == {
        "python-computation",
        "file-analysis",
        "git-operation",
    }

    nothing = ExecutorConfig(workspace=tmp_path / "absent", git_repo=tmp_path)
    assert await detect_capabilities(nothing) == []


def test_requirements_for_task_types() -> None:
    assert requirements_for_task_type("python-computation") == ["python-execution"]
    assert requirements_for_task_type("code-generation") == ["local-llm"]
    assert requirements_for_task_type("file-analysis") == ["file-management"]
    assert requirements_for_task_type("git-operation") == ["git-vfs"]
    with pytest.raises(UnknownTaskTypeError, match="unknown task type 'teleport'"):
        requirements_for_task_type("teleport")


async def test_a_child_never_runs_code_for_a_second_peer(pool: PythonSandboxPool) -> None:
    plant = {"code": f"import json\njson.planted = 'by peer-a'\n{PROCESS_TOKEN}"}
    peek = {"code": f"import json\n(getattr(json, 'planted', None), {PROCESS_TOKEN})"}
    first = await pool.run(plant, TaskContext("t-a1", "peer-a"))
    planted_pid = decode_value(first["value"])
    # The same peer keeps its warm child and its state (like a kernel of its own).
    again = await pool.run(peek, TaskContext("t-a2", "peer-a"))
    assert decode_value(again["value"]) == ("by peer-a", planted_pid)
    # Another peer gets the other, clean child; a third finds both taken and gets a fresh one.
    for peer in ("peer-b", "peer-c"):
        other = await pool.run(peek, TaskContext(f"t-{peer}", peer))
        planted, pid = decode_value(other["value"])
        assert planted is None and pid != planted_pid
    assert pool.stats()["recycled_for_isolation"] == 1
