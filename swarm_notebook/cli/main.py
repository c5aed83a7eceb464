"""``swarm-notebook`` command line: signal, worker, up, bench, roster, identity.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``signal`` never pays for
pandas or JupyterLab.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "signal": ("swarm_notebook.cli.signal", "run a signaling server"),
    "worker": ("swarm_notebook.cli.worker", "run a headless worker peer"),
    "up": ("swarm_notebook.cli.up", "signaling server + local workers + JupyterLab"),
    "bench": ("swarm_notebook.cli.bench", "benchmarks against raw aiortc, ipyparallel, Dask"),
    "roster": ("swarm_notebook.cli.roster", "who may vote in a room (add|remove|show|import)"),
    "identity": ("swarm_notebook.cli.identity", "this profile's key (show|rotate)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-notebook", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(args_list).parse_args(args_list)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
