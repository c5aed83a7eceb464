"""``swarm-notebook bench``: the swarm measured against raw aiortc, ipyparallel and Dask.

Suites run in order on loopback, each in separate processes; see
:mod:`swarm_notebook.bench.framework` for the suite contract and the JSON layout.

Example::

    from swarm_notebook.bench import NullProgress, default_suites, select_suites, run_suites
    report = run_suites(select_suites(default_suites(), ["raw"]), quick=True,
                        progress=NullProgress())
    print(render_table(report))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from swarm_notebook.bench.framework import (
    ALSO_COMPARED,
    COMPARISONS,
    REQUIRED_METRICS,
    BenchReport,
    Comparison,
    Metric,
    MetricRegistry,
    NullProgress,
    ProgressReporter,
    Suite,
    SuiteContext,
    TqdmProgress,
    render_table,
    run_suites,
)
from swarm_notebook.errors import UnknownSuiteError

__all__ = [
    "ALSO_COMPARED",
    "COMPARISONS",
    "REQUIRED_METRICS",
    "BenchReport",
    "Comparison",
    "Metric",
    "MetricRegistry",
    "NullProgress",
    "ProgressReporter",
    "Suite",
    "SuiteContext",
    "TqdmProgress",
    "UnknownSuiteError",
    "default_suites",
    "render_table",
    "run_suites",
    "select_suites",
]


def default_suites() -> list[Suite]:
    """Every suite of a full run.

    Each swarm suite runs right after the suite it is compared with, so both see the
    machine in the same state.
    """
    # Imported here so that ``python -m swarm_notebook.bench.raw_peer`` does not find its
    # own module already imported through this package.
    from swarm_notebook.bench.baselines import dask_suite, ipyparallel_suite
    from swarm_notebook.bench.dask_worker_suite import dask_worker_suite
    from swarm_notebook.bench.data_suite import data_suites
    from swarm_notebook.bench.isolation_suite import isolation_suite
    from swarm_notebook.bench.raw_aiortc import raw_suite
    from swarm_notebook.bench.swarm_suites import swarm_suites

    swarm, delegate, mesh6 = swarm_suites()
    data, data_1gbit = data_suites()
    # Each measurement runs next to its anchor (ratios are computed at the end, so order
    # is free): raw then the swarm's messaging, ipyparallel then delegation.
    return [
        raw_suite(),
        swarm,
        ipyparallel_suite(),
        delegate,
        isolation_suite(),
        dask_suite(),
        dask_worker_suite(),
        mesh6,
        data,
        data_1gbit,
    ]


def select_suites(suites: Sequence[Suite], only: Iterable[str] | None) -> list[Suite]:
    """Keep the named suites, in run order; an unknown name is an error, not a no-op."""
    if only is None:
        return list(suites)
    wanted = [name.strip() for name in only if name.strip()]
    known = {suite.name for suite in suites}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UnknownSuiteError(
            f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(s.name for s in suites)}"
        )
    return [suite for suite in suites if suite.name in wanted]
