"""``swarm-notebook bench [--json FILE] [--quick] [--only SUITE,...]``.

Runs the benchmark suites on loopback with progress on stderr, prints the table on
stdout and optionally writes the JSON report. Exit code 0 when every selected suite ran,
1 when any suite failed (its error is in the table and the JSON), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import swarm_notebook.environment as environment
from swarm_notebook.bench import (
    TqdmProgress,
    UnknownSuiteError,
    default_suites,
    render_table,
    run_suites,
    select_suites,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report here")
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples (under 2 minutes on 2 cores)"
    )
    parser.add_argument(
        "--only", metavar="SUITE,...", help="comma-separated suites to run (default: all)"
    )


def run(args: argparse.Namespace) -> int:
    suites = default_suites()
    try:
        chosen = select_suites(suites, args.only.split(",") if args.only else None)
    except UnknownSuiteError as exc:
        print(f"swarm-notebook bench: error: unknown_suite: {exc}", file=sys.stderr)
        return 2
    if not chosen:
        print("swarm-notebook bench: error: no_suite: --only selected nothing", file=sys.stderr)
        return 2
    if args.json is not None and not args.json.parent.is_dir():
        print(
            f"swarm-notebook bench: error: bad_path: no directory {args.json.parent}",
            file=sys.stderr,
        )
        return 2
    # Every peer of the bench lives on this machine: keep ICE on loopback (children inherit).
    os.environ.setdefault(environment.ICE_HOSTS, "127.0.0.1")
    report = run_suites(chosen, quick=args.quick, progress=TqdmProgress(sys.stderr))
    print(render_table(report))
    if args.json is not None:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 1 if report.errors else 0
