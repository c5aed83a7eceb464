"""``swarm-notebook doctor``: check the signaling server, the ICE servers and the NAT.

Exit status 0 when every check passed, 1 otherwise; each failure comes with advice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import swarm_notebook.environment as environment
from swarm_notebook.cli.ice_args import add_ice_arguments, mesh_with_ice
from swarm_notebook.coordinator.config import DEFAULT_SIGNALING
from swarm_notebook.errors import IceConfigError
from swarm_notebook.identity import default_profile_dir
from swarm_notebook.transport.ice_config import resolve
from swarm_notebook.views.doctor import Check, diagnose, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--signaling", default=os.environ.get(environment.SIGNALING)
                        or DEFAULT_SIGNALING)  # fmt: skip
    parser.add_argument(
        "--secret",
        default=os.environ.get(environment.SECRET),
        help="room secret, to see the ICE servers the signaling server issues",
    )
    parser.add_argument(
        "--ca-file", default=None, help="PEM to trust for wss:// (default $SWARM_NOTEBOOK_CA_FILE)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="profile with ice.json")
    add_ice_arguments(parser)


async def _diagnose(args: argparse.Namespace) -> list[Check]:
    mesh = mesh_with_ice(args)
    settings = resolve(
        mesh.ice_servers, mesh.ice_policy, profile_dir=args.profile or default_profile_dir()
    )
    return await diagnose(args.signaling, args.secret, settings, ca_file=args.ca_file)


def run(args: argparse.Namespace) -> int:
    try:
        checks = asyncio.run(_diagnose(args))
    except IceConfigError as exc:
        print(f"swarm-notebook doctor: {exc.message}", file=sys.stderr)
        return 2
    print(render(checks), flush=True)
    return 0 if all(c.ok for c in checks) else 1
