"""Benchmark framework: suites, metrics, statistics, comparisons, the table and the JSON.

A *suite* is a named callable (sync or async) that receives a :class:`SuiteContext` and
records metrics into it (or returns them). Suites run one after another, each on its own
fresh event loop; a suite that raises or overruns its time limit leaves an entry in
``errors`` and the run goes on. Metrics a run did not measure are absent, never invented.

Example::

    report = run_suites([Suite("demo", demo)], quick=True, progress=NullProgress())
    print(render_table(report))
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import inspect
import json
import os
import platform
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, cast

import numpy as np
import psutil

import swarm_notebook.environment as environment
from swarm_notebook.errors import LeftoverProcessesError, MetricError

Bound = Literal["<=", ">="]
Verdict = Literal["meets", "misses"]


@dataclass(frozen=True)
class Comparison:
    """How a metric relates to its anchor: ``ratio = metric median / anchor median``.

    ``bound``/``factor`` form the target (``"<= 1.5x"``); without them the ratio is
    reported for information only.
    """

    anchor: str
    bound: Bound | None = None
    factor: float | None = None

    @property
    def target(self) -> str | None:
        if self.bound is None or self.factor is None:
            return None
        return f"{self.bound} {self.factor:g}x"

    def verdict(self, ratio: float | None) -> Verdict | None:
        """``meets``/``misses`` for a ratio against the target; ``None`` if not judgeable."""
        if ratio is None or self.bound is None or self.factor is None:
            return None
        ok = ratio <= self.factor if self.bound == "<=" else ratio >= self.factor
        return "meets" if ok else "misses"


# The one table of anchors and targets, the integrator's swarm metrics included so the
# comparison is fixed before anyone measures it.
COMPARISONS: Mapping[str, Comparison] = MappingProxyType(
    {
        "swarm_rtt_ms": Comparison("raw_rtt_ms", "<=", 1.5),
        "swarm_rtt_bridged_ms": Comparison("raw_rtt_ms"),
        "swarm_bulk_MBps": Comparison("raw_bulk_MBps", ">=", 0.8),
        "delegate_rtt_ms": Comparison("ipyparallel_rtt_ms", "<=", 0.5),
        "delegate_tasks_per_s": Comparison("ipyparallel_tasks_per_s", ">=", 2.0),
        "df50_swarm_s": Comparison("df50_raw_s"),
        "dask_rtt_ms": Comparison("ipyparallel_rtt_ms"),
        "dask_tasks_per_s": Comparison("ipyparallel_tasks_per_s"),
        "submit_rtt_ms": Comparison("ipyparallel_rtt_ms", "<=", 0.5),
        "map_items_per_s": Comparison("ipyparallel_map_items_per_s", ">=", 2.0),
        "dask_map_items_per_s": Comparison("ipyparallel_map_items_per_s"),
        # The sandbox's price: the same work to bubblewrap and to unisolated workers.
        "sandboxed_tasks_per_s": Comparison("unsandboxed_tasks_per_s", ">=", 0.9),
        "sandboxed_rtt_ms": Comparison("unsandboxed_rtt_ms"),
        # Fronting a Dask cluster: the same 2,000-item map through the swarm and direct.
        "dask_worker_map_s": Comparison("dask_direct_map_s", "<=", 1.5),
        # Data movement (issue 12): one frame pushed and pulled back, each tool in one run.
        "data_df50_swarm_s": Comparison("data_df50_dask_s", "<=", 6.0),
        "data_df50_ipyparallel_s": Comparison("data_df50_dask_s"),
        "data_realistic50_swarm_s": Comparison("data_realistic50_dask_s", "<=", 2.0),
        "data_realistic50_ipyparallel_s": Comparison("data_realistic50_dask_s"),
        "data_df50_rss_delegator_MB": Comparison("data_df50_frame_MB", "<=", 2.0),
        "data_df50_rss_worker_MB": Comparison("data_df50_frame_MB", "<=", 2.0),
        "data_df50_swarm_link_MB": Comparison("data_df50_frame_MB"),
        "data_realistic50_swarm_link_MB": Comparison("data_realistic50_frame_MB"),
        # Resident data: 20 tasks on a frame put once (the put is timed apart, unjudged).
        "data_resident20_swarm_s": Comparison("data_resident20_dask_s", "<=", 1.2),
        "data_resident20_ipyparallel_s": Comparison("data_resident20_dask_s"),
        "data_resident20_put_swarm_s": Comparison("data_resident20_put_dask_s"),
        "data_resident20_put_ipyparallel_s": Comparison("data_resident20_put_dask_s"),
        "data1g_df50_swarm_s": Comparison("data1g_df50_dask_s", "<=", 1.5),
        "data1g_realistic50_swarm_s": Comparison("data1g_realistic50_dask_s"),
    }
)

# Targets against a second tool in the same run (the first anchor is in COMPARISONS):
# a metric shows one row per anchor.
ALSO_COMPARED: Mapping[str, tuple[Comparison, ...]] = MappingProxyType(
    {
        "submit_rtt_ms": (Comparison("dask_rtt_ms", "<=", 0.1),),
        "map_items_per_s": (Comparison("dask_map_items_per_s", ">=", 2.0),),
        "delegate_rtt_ms": (Comparison("dask_rtt_ms"),),
        # The transport's own floor next to targets set against Dask: a swarm task needs
        # at least one bare round trip, and a push + pull at least twice the one-way bytes.
        "raw_rtt_ms": (Comparison("dask_rtt_ms"),),
        "df50_raw_s": (Comparison("data_df50_dask_s"),),
        "data_df50_swarm_s": (Comparison("data_df50_ipyparallel_s"),),
        "data_realistic50_swarm_s": (Comparison("data_realistic50_ipyparallel_s"),),
        "data_resident20_swarm_s": (Comparison("data_resident20_ipyparallel_s"),),
    }
)

PROCESS_EXIT_GRACE_S = 15.0

# Every metric name the full benchmark is expected to produce (raw + baselines now, the
# swarm's own suites added by the integrator).
REQUIRED_METRICS: tuple[str, ...] = (
    "raw_rtt_ms",
    "raw_connect_ms",
    "raw_bulk_MBps",
    "df50_raw_s",
    "ipyparallel_rtt_ms",
    "ipyparallel_tasks_per_s",
    "dask_rtt_ms",
    "dask_tasks_per_s",
    "ipyparallel_map_items_per_s",
    "dask_map_items_per_s",
    "swarm_rtt_ms",
    "swarm_bulk_MBps",
    "delegate_rtt_ms",
    "delegate_tasks_per_s",
    "submit_rtt_ms",
    "map_items_per_s",
    "cancel_to_gone_ms",
    "df50_swarm_s",
    "mesh6_s",
    "sandboxed_rtt_ms",
    "unsandboxed_rtt_ms",
    "sandboxed_tasks_per_s",
    "unsandboxed_tasks_per_s",
    "dask_worker_map_s",
    "dask_direct_map_s",
    "data_df50_swarm_s",
    "data_df50_dask_s",
    "data_df50_ipyparallel_s",
    "data_realistic50_swarm_s",
    "data_realistic50_dask_s",
    "data_realistic50_ipyparallel_s",
    "data_df50_rss_delegator_MB",
    "data_df50_rss_worker_MB",
    "data_resident20_swarm_s",
    "data_resident20_dask_s",
    "data_resident20_ipyparallel_s",
    "data_resident20_put_swarm_s",
    "data_resident20_put_dask_s",
    "data_resident20_put_ipyparallel_s",
    "data1g_df50_swarm_s",
    "data1g_df50_dask_s",
    "data1g_realistic50_swarm_s",
    "data1g_realistic50_dask_s",
)


@dataclass(frozen=True)
class Metric:
    """Samples of one measured quantity, e.g. ``Metric("raw_rtt_ms", (0.41, 0.44), "ms")``."""

    name: str
    samples: tuple[float, ...]
    unit: str
    note: str = ""  # e.g. the compression setting a tool ran with

    def __post_init__(self) -> None:
        if not self.samples:
            raise MetricError(f"metric {self.name!r}: no samples")
        if not all(np.isfinite(s) for s in self.samples):
            raise MetricError(f"metric {self.name!r}: non-finite sample")

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p95(self) -> float:
        """95th percentile, linear interpolation between closest ranks."""
        return float(np.percentile(self.samples, 95))


class MetricRegistry:
    """The metrics measured so far in a run; later suites read their anchors here."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def record(self, name: str, samples: Iterable[float], unit: str, note: str = "") -> Metric:
        """Record a metric once; recording the same name twice is an error."""
        if name in self._metrics:
            raise MetricError(f"metric {name!r} recorded twice")
        metric = Metric(name, tuple(float(s) for s in samples), unit, note)
        self._metrics[name] = metric
        return metric

    def get(self, name: str) -> Metric | None:
        return self._metrics.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._metrics

    def __iter__(self) -> Iterator[Metric]:
        return iter(list(self._metrics.values()))

    def __len__(self) -> int:
        return len(self._metrics)


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class ProgressReporter(Protocol):
    """Shows which suite and which sample is running."""

    def task(self, description: str, total: int | None) -> Any:
        """A context manager yielding a :class:`ProgressTask`."""
        ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class NullProgress:
    """Progress reporter that shows nothing (tests, ``--json`` in pipelines)."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[ProgressTask]:
        yield _NullTask()


class _TqdmTask:
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)


class TqdmProgress:
    """Progress bars on stderr, one per suite phase."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[ProgressTask]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, file=self._stream, leave=True, unit="sample")
        try:
            yield _TqdmTask(bar)
        finally:
            bar.close()


@dataclass
class SuiteContext:
    """What a suite receives: the quick flag, progress, and the metrics measured so far."""

    quick: bool
    progress: ProgressReporter
    results: MetricRegistry
    suite_name: str = ""

    def record(self, name: str, samples: Iterable[float], unit: str, note: str = "") -> Metric:
        """Record a metric measured by this suite (``note``: how it was measured)."""
        return self.results.record(name, samples, unit, note)

    def task(self, what: str, total: int | None) -> Any:
        """A progress task labelled with this suite's name."""
        return self.progress.task(f"{self.suite_name}: {what}", total)


SuiteOutcome = Iterable[Metric] | None
SuiteFn = Callable[[SuiteContext], SuiteOutcome | Awaitable[SuiteOutcome]]


@dataclass(frozen=True)
class Suite:
    """A named benchmark step. ``timeout_s``/``quick_timeout_s`` bound async suites."""

    name: str
    run: SuiteFn
    timeout_s: float = 600.0
    quick_timeout_s: float = 120.0
    description: str = ""
    full_only: bool = False  # left out of --quick runs (too slow, or needs root)


@dataclass(frozen=True)
class MetricRow:
    """One metric with its statistics and its comparison against its anchor."""

    metric: Metric
    anchor: str | None
    ratio: float | None
    target: str | None
    verdict: Verdict | None

    def to_json(self) -> dict[str, Any]:
        note = {"note": self.metric.note} if self.metric.note else {}
        return {
            **note,
            "median": self.metric.median,
            "p95": self.metric.p95,
            "samples": len(self.metric.samples),
            "unit": self.metric.unit,
            "anchor": self.anchor,
            "ratio": self.ratio,
            "target": self.target,
            "verdict": self.verdict,
        }


def compare(
    metric: Metric, results: MetricRegistry, comparison: Comparison | None = None
) -> MetricRow:
    """Relate a metric to its declared anchor (if any, and if the anchor was measured)."""
    comparison = comparison or COMPARISONS.get(metric.name)
    if comparison is None:
        return MetricRow(metric, None, None, None, None)
    anchor = results.get(comparison.anchor)
    ratio = None
    if anchor is not None and anchor.median != 0:
        ratio = metric.median / anchor.median
    return MetricRow(metric, comparison.anchor, ratio, comparison.target, comparison.verdict(ratio))


@dataclass
class BenchReport:
    """The outcome of one run: metrics with comparisons, per-suite errors, machine facts."""

    machine: dict[str, Any]
    when: str
    quick: bool
    results: MetricRegistry
    errors: dict[str, str] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[MetricRow]:
        """One row per metric and anchor: the first anchor's row, then any others'."""
        rows: list[MetricRow] = []
        for metric in self.results:
            rows.append(compare(metric, self.results))
            for other in ALSO_COMPARED.get(metric.name, ()):
                if self.results.get(other.anchor) is not None:
                    rows.append(compare(metric, self.results, other))
        return rows

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for row in self.rows():
            if row.metric.name not in metrics:
                metrics[row.metric.name] = row.to_json()
            else:
                also = metrics[row.metric.name].setdefault("also", [])
                also.append(
                    {"anchor": row.anchor, "ratio": row.ratio, "target": row.target,
                     "verdict": row.verdict}
                )  # fmt: skip
        return {
            "machine": self.machine,
            "when": self.when,
            "quick": self.quick,
            "metrics": metrics,
            "errors": dict(self.errors),
            "suite_seconds": dict(self.durations_s),
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """CPU count, Python, platform and the versions of the compared libraries."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiortc": _version("aiortc"),
        "libdatachannel-py": _version("libdatachannel-py"),
        "transport_backend": os.environ.get(environment.TRANSPORT_BACKEND) or "aiortc",
        "ipyparallel": _version("ipyparallel"),
        "dask": _version("dask"),
    }


@contextmanager
def reaped_children(label: str, grace_s: float = PROCESS_EXIT_GRACE_S) -> Iterator[None]:
    """Ensure every child process started inside the block has exited when it ends.

    Stragglers get a grace period, then are killed; if the block itself succeeded that is
    reported as :class:`LeftoverProcessesError` (a failing block keeps its own error).
    """
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    finally:
        stragglers = _stop_new_children(me, before, grace_s)
    if stragglers:
        raise LeftoverProcessesError(
            f"{label} left {len(stragglers)} process(es) running ({', '.join(stragglers)}); killed"
        )


def _stop_new_children(me: psutil.Process, before: set[int], grace_s: float) -> list[str]:
    new = [
        p for p in me.children(recursive=True) if p.pid not in before and not _is_process_helper(p)
    ]
    _, alive = psutil.wait_procs(new, timeout=grace_s)
    names = [_name(p) for p in alive]
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s + 5.0)
    return names


def _is_process_helper(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker serves this whole process and outlives any pool."""
    try:
        return any("multiprocessing.resource_tracker" in arg for arg in proc.cmdline())
    except psutil.Error:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return str(proc.pid)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500] if first else type(exc).__name__


async def _bounded(awaitable: Awaitable[SuiteOutcome], timeout: float) -> SuiteOutcome:
    return await asyncio.wait_for(awaitable, timeout)


def _run_one(suite: Suite, ctx: SuiteContext) -> None:
    timeout = suite.quick_timeout_s if ctx.quick else suite.timeout_s
    outcome = suite.run(ctx)
    returned: SuiteOutcome
    if inspect.isawaitable(outcome):
        # A fresh loop per suite: nothing one suite leaves behind runs into the next.
        returned = asyncio.run(_bounded(outcome, timeout))
    else:
        # A sync suite bounds its own waits; nothing could interrupt this thread.
        returned = cast(SuiteOutcome, outcome)
    for metric in returned or ():
        ctx.results.record(metric.name, metric.samples, metric.unit, metric.note)


def run_suites(
    suites: Sequence[Suite],
    *,
    quick: bool,
    progress: ProgressReporter,
    now: Callable[[], dt.datetime] | None = None,
) -> BenchReport:
    """Run suites in order; a failing suite is recorded in ``errors`` and the run goes on."""
    import time

    clock = now or (lambda: dt.datetime.now(dt.UTC))
    report = BenchReport(
        machine=machine_facts(),
        when=clock().isoformat(timespec="seconds"),
        quick=quick,
        results=MetricRegistry(),
    )
    for suite in suites:
        if quick and suite.full_only:
            continue
        ctx = SuiteContext(
            quick=quick, progress=progress, results=report.results, suite_name=suite.name
        )
        wait_for_quiet_cpu()
        started = time.perf_counter()
        try:
            with reaped_children(f"suite {suite.name!r}"):
                _run_one(suite, ctx)
        except TimeoutError:
            limit = suite.quick_timeout_s if quick else suite.timeout_s
            report.errors[suite.name] = f"timeout: suite exceeded {limit:g} s"
        except Exception as exc:  # a broken suite must not stop the others
            report.errors[suite.name] = _describe(exc)
        report.durations_s[suite.name] = round(time.perf_counter() - started, 3)
    return report


def wait_for_quiet_cpu(
    threshold_percent: float = 25.0, window_s: float = 0.5, max_wait_s: float = 15.0
) -> float:
    """Let the previous suite's processes finish winding down before measuring again.

    Measured here: the swarm's bulk run right after the Dask suite read ~0.75x of raw,
    the same run right after the raw suite ~1.0x. Returns the CPU use it ended at.
    """
    import time

    import psutil

    deadline = time.monotonic() + max_wait_s
    busy = psutil.cpu_percent(interval=window_s)
    while busy > threshold_percent and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=window_s)
    return busy


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render_table(report: BenchReport) -> str:
    """Plain-text table: metric, median, p95, samples, unit, ratio, target, verdict.

    Failed suites follow as ``[suite] ERROR message`` lines: no number stands in for them.
    """
    header = ("metric", "median", "p95", "samples", "unit", "ratio vs anchor", "target", "verdict")
    lines: list[tuple[str, ...]] = [header]
    for row in report.rows():
        if row.anchor is None:
            ratio = "-"
        elif row.ratio is None:
            ratio = f"(no {row.anchor})"
        else:
            ratio = f"{row.ratio:.2f}x {row.anchor}"
        lines.append(
            (
                row.metric.name,
                _fmt(row.metric.median),
                _fmt(row.metric.p95),
                str(len(row.metric.samples)),
                row.metric.unit,
                ratio,
                row.target or "-",
                row.verdict or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    ]
    # One note per metric, not per anchor row.
    out.extend(f"note {m.name}: {m.note}" for m in report.results if m.note)
    out.extend(f"[{suite}] ERROR {message}" for suite, message in report.errors.items())
    return "\n".join(out)
