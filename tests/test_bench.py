"""``swarm-notebook bench``: framework statistics and verdicts, failure handling, the JSON
layout, and the raw aiortc suite with two real peer processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

import swarm_notebook.environment as environment
from swarm_notebook.bench import (
    ALSO_COMPARED,
    COMPARISONS,
    Metric,
    MetricRegistry,
    NullProgress,
    Suite,
    SuiteContext,
    UnknownSuiteError,
    default_suites,
    render_table,
    run_suites,
    select_suites,
)
from swarm_notebook.bench.data_suite import DataBenchConfig, data_suites
from swarm_notebook.bench.framework import (
    Comparison,
    LeftoverProcessesError,
    MetricError,
    compare,
    reaped_children,
)
from swarm_notebook.bench.raw_aiortc import RawConfig, raw_suite

RAW_METRICS = {"raw_connect_ms", "raw_rtt_ms", "raw_bulk_MBps", "df50_raw_s"}
METRIC_KEYS = {"median": float, "p95": float, "samples": int, "unit": str}
OPTIONAL_METRIC_KEYS = {"anchor": str, "ratio": float, "target": str}


def child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def assert_report_schema(doc: dict[str, Any]) -> None:
    assert {"machine", "when", "quick", "metrics", "errors"} <= doc.keys()
    machine = doc["machine"]
    assert isinstance(machine["cpu_count"], int) and machine["cpu_count"] >= 1
    for key in ("python", "platform", "aiortc", "ipyparallel", "dask"):
        assert isinstance(machine[key], str) and machine[key], key
    assert doc["when"].endswith("+00:00") and "T" in doc["when"]
    assert isinstance(doc["quick"], bool)
    assert isinstance(doc["errors"], dict)
    for name, entry in doc["metrics"].items():
        for key, kind in METRIC_KEYS.items():
            assert isinstance(entry[key], kind), (name, key)
        for key, kind in OPTIONAL_METRIC_KEYS.items():
            assert entry[key] is None or isinstance(entry[key], kind), (name, key)
        assert entry["samples"] >= 1


class RecordingProgress:
    """A real progress reporter that remembers which tasks ran and how far they got."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[int]] = {}

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        counts = self.tasks.setdefault(description, [0, total or 0])

        class Task:
            def advance(self, n: int = 1) -> None:
                counts[0] += n

            def note(self, text: str) -> None:
                pass

        yield Task()


# ------------------------------------------------------------------------------ stats


def test_median_and_p95_on_known_samples() -> None:
    metric = Metric("x_ms", tuple(float(i) for i in range(1, 101)), "ms")
    assert metric.median == pytest.approx(50.5)
    # Linear interpolation between closest ranks: rank 0.95 * 99 = 94.05 -> 95.05.
    assert metric.p95 == pytest.approx(95.05)
    odd = Metric("y_ms", (5.0, 1.0, 3.0), "ms")
    assert odd.median == 3.0
    assert odd.p95 == pytest.approx(4.8)
    single = Metric("z_s", (2.5,), "s")
    assert (single.median, single.p95) == (2.5, 2.5)


def test_metric_rejects_empty_non_finite_and_duplicate() -> None:
    with pytest.raises(MetricError, match="no samples"):
        Metric("x", (), "ms")
    with pytest.raises(MetricError, match="non-finite"):
        Metric("x", (1.0, float("nan")), "ms")
    registry = MetricRegistry()
    registry.record("x", [1.0], "ms")
    with pytest.raises(MetricError, match="twice"):
        registry.record("x", [2.0], "ms")


# --------------------------------------------------------------------- ratio and verdict


def test_verdict_per_declared_bound() -> None:
    at_most = Comparison("a", "<=", 1.5)
    assert at_most.target == "<= 1.5x"
    assert at_most.verdict(1.5) == "meets"
    assert at_most.verdict(1.51) == "misses"
    at_least = Comparison("a", ">=", 2.0)
    assert at_least.target == ">= 2x"
    assert at_least.verdict(2.0) == "meets"
    assert at_least.verdict(1.99) == "misses"
    informative = Comparison("a")
    assert informative.target is None and informative.verdict(0.1) is None
    assert at_most.verdict(None) is None


def test_declared_targets_match_the_plan() -> None:
    expected = {
        "swarm_rtt_ms": ("raw_rtt_ms", "<= 1.5x"),
        "swarm_rtt_bridged_ms": ("raw_rtt_ms", None),
        "delegate_rtt_ms": ("ipyparallel_rtt_ms", "<= 0.5x"),
        "delegate_tasks_per_s": ("ipyparallel_tasks_per_s", ">= 2x"),
        "swarm_bulk_MBps": ("raw_bulk_MBps", ">= 0.8x"),
        "df50_swarm_s": ("df50_raw_s", None),
        "dask_rtt_ms": ("ipyparallel_rtt_ms", None),
        "dask_tasks_per_s": ("ipyparallel_tasks_per_s", None),
        "submit_rtt_ms": ("ipyparallel_rtt_ms", "<= 0.5x"),
        "map_items_per_s": ("ipyparallel_map_items_per_s", ">= 2x"),
        "dask_map_items_per_s": ("ipyparallel_map_items_per_s", None),
        "sandboxed_tasks_per_s": ("unsandboxed_tasks_per_s", ">= 0.9x"),
        "sandboxed_rtt_ms": ("unsandboxed_rtt_ms", None),
        "dask_worker_map_s": ("dask_direct_map_s", "<= 1.5x"),
        "data_df50_swarm_s": ("data_df50_dask_s", "<= 6x"),
        "data_df50_ipyparallel_s": ("data_df50_dask_s", None),
        "data_realistic50_swarm_s": ("data_realistic50_dask_s", "<= 2x"),
        "data_realistic50_ipyparallel_s": ("data_realistic50_dask_s", None),
        "data_df50_rss_delegator_MB": ("data_df50_frame_MB", "<= 2x"),
        "data_df50_rss_worker_MB": ("data_df50_frame_MB", "<= 2x"),
        "data_df50_swarm_link_MB": ("data_df50_frame_MB", None),
        "data_realistic50_swarm_link_MB": ("data_realistic50_frame_MB", None),
        "data_resident20_swarm_s": ("data_resident20_dask_s", "<= 1.2x"),
        "data_resident20_ipyparallel_s": ("data_resident20_dask_s", None),
        "data_resident20_put_swarm_s": ("data_resident20_put_dask_s", None),
        "data_resident20_put_ipyparallel_s": ("data_resident20_put_dask_s", None),
        "data1g_df50_swarm_s": ("data1g_df50_dask_s", "<= 1.5x"),
        "data1g_realistic50_swarm_s": ("data1g_realistic50_dask_s", None),
    }
    assert {name: (c.anchor, c.target) for name, c in COMPARISONS.items()} == expected
    also = {name: [(c.anchor, c.target) for c in cs] for name, cs in ALSO_COMPARED.items()}
    assert also["data_resident20_swarm_s"] == [("data_resident20_ipyparallel_s", None)]
    assert also["data_df50_swarm_s"] == [("data_df50_ipyparallel_s", None)]


def test_compare_uses_anchor_median_and_leaves_missing_anchor_unjudged() -> None:
    registry = MetricRegistry()
    registry.record("raw_rtt_ms", [0.4, 0.5, 0.6], "ms")
    swarm = registry.record("swarm_rtt_ms", [0.7, 0.8, 0.9], "ms")
    row = compare(swarm, registry)
    assert row.anchor == "raw_rtt_ms"
    assert row.ratio == pytest.approx(0.8 / 0.5)
    assert row.verdict == "misses"
    bulk = registry.record("swarm_bulk_MBps", [20.0], "MB/s")
    unanchored = compare(bulk, registry)
    assert unanchored.anchor == "raw_bulk_MBps"
    assert unanchored.ratio is None and unanchored.verdict is None
    raw = registry.get("raw_rtt_ms")
    assert raw is not None and compare(raw, registry).anchor is None


def test_a_metric_with_a_second_anchor_gets_a_row_and_json_entry_for_each() -> None:
    def measured(ctx: SuiteContext) -> None:
        ctx.record("ipyparallel_rtt_ms", [4.0], "ms")
        ctx.record("dask_rtt_ms", [10.0], "ms")
        ctx.record("submit_rtt_ms", [1.5], "ms", note="one at a time")
        ctx.record("map_items_per_s", [900.0], "items/s")  # no anchor measured: no rows
        ctx.record("raw_rtt_ms", [2.0], "ms")  # the transport's floor, shown, not judged

    report = run_suites([Suite("m", measured)], quick=True, progress=NullProgress())
    rows = [(r.metric.name, r.anchor, r.verdict) for r in report.rows()]
    assert ("submit_rtt_ms", "ipyparallel_rtt_ms", "meets") in rows  # 0.375x <= 0.5x
    assert ("submit_rtt_ms", "dask_rtt_ms", "misses") in rows  # 0.15x > 0.1x
    assert [r for r in rows if r[0] == "map_items_per_s"] == [
        ("map_items_per_s", "ipyparallel_map_items_per_s", None)
    ]
    assert [r for r in rows if r[0] == "raw_rtt_ms"] == [
        ("raw_rtt_ms", None, None),
        ("raw_rtt_ms", "dask_rtt_ms", None),
    ]
    submit = report.to_json()["metrics"]["submit_rtt_ms"]
    assert submit["verdict"] == "meets"
    assert submit["also"] == [
        {"anchor": "dask_rtt_ms", "ratio": pytest.approx(0.15), "target": "<= 0.1x",
         "verdict": "misses"}
    ]  # fmt: skip
    table = render_table(report)
    assert "dask_rtt_ms" in table
    assert table.count("note submit_rtt_ms: one at a time") == 1  # not once per anchor


# ------------------------------------------------------------------- suites and failures


def test_failing_suite_is_recorded_and_the_run_continues() -> None:
    def measured_first(ctx: SuiteContext) -> None:
        ctx.record("ipyparallel_rtt_ms", [4.0, 5.0, 6.0], "ms")

    async def broken(ctx: SuiteContext) -> None:
        ctx.record("dask_rtt_ms", [10.0], "ms")
        raise ConnectionRefusedError("scheduler unreachable")

    async def stalls(ctx: SuiteContext) -> None:
        await asyncio.Event().wait()

    async def measured_after(ctx: SuiteContext) -> list[Metric]:
        assert "ipyparallel_rtt_ms" in ctx.results
        return [Metric("delegate_rtt_ms", (2.0, 2.0), "ms")]

    report = run_suites(
        [
            Suite("first", measured_first),
            Suite("broken", broken),
            Suite("stalls", stalls, quick_timeout_s=0.2),
            Suite("after", measured_after),
        ],
        quick=True,
        progress=NullProgress(),
    )
    assert report.errors == {
        "broken": "ConnectionRefusedError: scheduler unreachable",
        "stalls": "timeout: suite exceeded 0.2 s",
    }
    doc = report.to_json()
    assert set(doc["metrics"]) == {"ipyparallel_rtt_ms", "dask_rtt_ms", "delegate_rtt_ms"}
    delegate = doc["metrics"]["delegate_rtt_ms"]
    assert delegate["ratio"] == pytest.approx(0.4)
    assert (delegate["target"], delegate["verdict"]) == ("<= 0.5x", "meets")
    table = render_table(report)
    assert "[broken] ERROR ConnectionRefusedError: scheduler unreachable" in table
    assert "[stalls] ERROR timeout" in table
    assert "0.40x ipyparallel_rtt_ms" in table


def test_report_json_schema(tmp_path: Path) -> None:
    def one(ctx: SuiteContext) -> None:
        ctx.record("raw_rtt_ms", [0.4, 0.5], "ms")
        ctx.record("swarm_rtt_ms", [0.6, 0.7], "ms")

    report = run_suites([Suite("one", one)], quick=False, progress=NullProgress())
    out = tmp_path / "bench.json"
    report.write_json(out)
    doc = json.loads(out.read_text())
    assert_report_schema(doc)
    assert doc["quick"] is False and doc["errors"] == {}
    swarm = doc["metrics"]["swarm_rtt_ms"]
    assert swarm == {
        "median": pytest.approx(0.65), "p95": pytest.approx(0.695), "samples": 2,
        "unit": "ms", "anchor": "raw_rtt_ms", "ratio": pytest.approx(0.65 / 0.45),
        "target": "<= 1.5x", "verdict": "meets",
    }
    assert doc["metrics"]["raw_rtt_ms"]["anchor"] is None


def test_select_suites_rejects_unknown_names() -> None:
    suites = default_suites()
    assert [s.name for s in suites] == [
        "raw",
        "swarm",
        "ipyparallel",
        "delegate",
        "isolation",
        "dask",
        "dask-worker",
        "mesh6",
        "data",
        "data-1gbit",
    ]
    assert [s.name for s in select_suites(suites, ["dask", "raw"])] == ["raw", "dask"]
    with pytest.raises(UnknownSuiteError, match="nope"):
        select_suites(suites, ["raw", "nope"])


def test_reaped_children_kills_and_reports_a_leftover_process() -> None:
    before = child_pids()
    with pytest.raises(LeftoverProcessesError, match="left 1 process"):
        with reaped_children("demo", grace_s=0.2):
            leftover = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                        stdin=subprocess.PIPE)
    # The straggler was killed and reaped by the check itself, long before stdin closed.
    assert not psutil.pid_exists(leftover.pid)
    assert child_pids() <= before
    assert leftover.stdin is not None
    leftover.stdin.close()
    leftover.wait(timeout=5)


# ----------------------------------------------------------------------- raw aiortc suite


@pytest.mark.parametrize("backend", ["aiortc", "direct"])
def test_raw_suite_connects_two_processes_and_measures(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct links carry one channel, so its raw peers share it for the echo and the sink."""
    monkeypatch.setenv(environment.TRANSPORT_BACKEND, backend)
    before = child_pids()
    progress = RecordingProgress()
    report = run_suites([raw_suite(RawConfig.tiny())], quick=True, progress=progress)
    assert report.errors == {}
    metrics = {m.name: m for m in report.results}
    assert set(metrics) == RAW_METRICS
    tiny = RawConfig.tiny()
    assert len(metrics["raw_connect_ms"].samples) == tiny.connect_samples
    assert len(metrics["raw_rtt_ms"].samples) == tiny.rtt_samples
    assert 1.0 < metrics["raw_connect_ms"].median < 5000.0
    assert 0.01 < metrics["raw_rtt_ms"].median < 100.0
    assert metrics["raw_bulk_MBps"].median > 1.0
    assert 0.0 < metrics["df50_raw_s"].median < 10.0
    assert progress.tasks["raw: rtt"] == [tiny.rtt_samples, tiny.rtt_samples]
    assert progress.tasks["raw: bulk"] == [tiny.bulk_samples, tiny.bulk_samples]
    assert child_pids() <= before


def test_raw_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="bad_config: chunk_bytes"):
        RawConfig(chunk_bytes=100_000)
    with pytest.raises(ValueError, match="bad_config: rtt_samples"):
        RawConfig(rtt_samples=0)


def test_raw_peer_child_reports_bad_config_as_an_error_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "swarm_notebook.bench.raw_peer", "offer", '{"chunk_bytes": 0}'],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["type"] == "error" and "bad_config: chunk_bytes" in line["message"]


def test_cli_quick_raw_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "swarm_notebook.cli.main", "bench", "--quick", "--only", "raw",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert_report_schema(doc)
    assert doc["quick"] is True and doc["errors"] == {}
    assert set(doc["metrics"]) == RAW_METRICS
    assert doc["metrics"]["raw_rtt_ms"]["samples"] == RawConfig.quick().rtt_samples
    assert "raw_rtt_ms" in done.stdout and "verdict" in done.stdout
    assert "raw: rtt" in done.stderr  # progress went to stderr


def test_cli_unknown_suite_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "swarm_notebook.cli.main", "bench", "--only", "raw,bogus"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2
    assert "unknown_suite" in done.stderr and "bogus" in done.stderr


# ------------------------------------------------------------------------ data suite

DATA_TOOLS = ("swarm", "dask", "ipyparallel")


@pytest.mark.timeout(420)
def test_data_suite_runs_every_tool_and_resident20_for_real() -> None:
    """Tiny frames through a real signaling server, swarm worker, Dask scheduler + worker
    and ipyparallel engine: every push/pull and every resident20 path must answer right."""
    before = child_pids()
    tiny = DataBenchConfig(df50_rows=20_000, realistic_rows=20_000, rounds=1)
    data = data_suites(tiny)[0]
    assert data.name == "data"
    report = run_suites([data], quick=True, progress=NullProgress())
    assert report.errors == {}
    metrics = {m.name: m for m in report.results}
    for tool in DATA_TOOLS:
        for frame in ("df50", "realistic50", "resident20"):
            assert len(metrics[f"data_{frame}_{tool}_s"].samples) == 1, (frame, tool)
        put = metrics[f"data_resident20_put_{tool}_s"]
        assert len(put.samples) == 1 and "one-off" in put.note
        assert "20 tasks gathered" in metrics[f"data_resident20_{tool}_s"].note
    for name in ("rss_delegator", "rss_worker", "dask_rss_client", "ipyparallel_rss_engine"):
        assert f"data_df50_{name}_MB" in metrics
    rows = [(r.metric.name, r.anchor, r.target) for r in report.rows()]
    assert ("data_resident20_swarm_s", "data_resident20_dask_s", "<= 1.2x") in rows
    assert ("data_resident20_swarm_s", "data_resident20_ipyparallel_s", None) in rows
    assert child_pids() <= before


def test_quick_data_config_is_a_tenth_without_ipyparallel() -> None:
    quick, full = DataBenchConfig.quick(), DataBenchConfig.full()
    assert (quick.df50_rows, quick.rounds, quick.ipyparallel) == (full.df50_rows // 10, 1, False)
    assert full.ipyparallel and full.rounds == 3
