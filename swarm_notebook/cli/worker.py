"""``swarm-notebook worker``: a headless peer that runs tasks for the room.

SIGINT/SIGTERM stop it gracefully: it takes no new tasks, lets running ones finish within
the grace period, and hands the rest back to their delegators, who retry them elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import swarm_notebook.environment as environment
from swarm_notebook._util.orphan import stop_when_orphaned
from swarm_notebook.cli.ice_args import add_ice_arguments, mesh_with_ice
from swarm_notebook.coordinator.config import DEFAULT_ROOM, DEFAULT_SIGNALING, CoordinatorConfig
from swarm_notebook.errors import (
    IceConfigError,
    IdentityError,
    SandboxUnavailable,
    SignalingError,
    UsageError,
)
from swarm_notebook.identity import require_canonical
from swarm_notebook.workload.executors.capabilities import (
    PYTHON_EXECUTION,
    ExecutorConfig,
    check_isolation,
)
from swarm_notebook.workload.executors.dask_cluster import parse_dask_address
from swarm_notebook.workload.policy import TaskPolicy
from swarm_notebook.workload.sandbox.bwrap import ISOLATION_NONE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", default=DEFAULT_ROOM)
    parser.add_argument("--signaling", default=DEFAULT_SIGNALING)
    parser.add_argument(
        "--secret",
        default=os.environ.get(environment.SECRET),
        help="room secret if the server requires one "
        f"(default ${environment.SECRET}; the variable keeps it out of ps)",
    )
    parser.add_argument(
        "--ca-file",
        default=os.environ.get(environment.CA_FILE),
        help="PEM certificate to trust for a wss:// signaling server, e.g. its self-signed"
        " one (default $SWARM_NOTEBOOK_CA_FILE, then the system's authorities)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile folder holding this worker's key and stores",
    )
    parser.add_argument(
        "--caps",
        default="",
        help="capabilities to offer, e.g. python-execution,file-management; "
        "python-execution means running other peers' code",
    )
    parser.add_argument("--workspace", type=Path, default=None, help="folder for file-analysis")
    parser.add_argument("--git-repo", type=Path, default=None, help="repository for git-operation")
    parser.add_argument("--llm-endpoint", default=None, help="OpenAI-compatible endpoint URL")
    parser.add_argument("--llm-model", default=None)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--memory-limit-mb", type=int, default=1024)
    parser.add_argument(
        "--session-idle-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="end a session (a namespace kept for a notebook) unused this long; it holds "
        "one slot and one sandbox process while open (default 30 min; a notebook may ask "
        "for less, up to 24 h)",
    )
    parser.add_argument(
        "--unsafe-no-isolation",
        action="store_true",
        help="run other peers' Python without the bubblewrap sandbox, with your user rights "
        "(they can read your files and keys); only where bwrap cannot run and every peer "
        "is trusted. The agent card and dashboard show it (docs/sandbox.md)",
    )
    parser.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="run python-computation on a Dask cluster: a scheduler address "
        "(tcp://HOST:8786) or local:N to start a LocalCluster of N worker processes. Dask "
        "runs code without isolation, so only peers on the allowlist (the room's roster "
        "and --allow) are served; implies python-execution (docs/dask.md)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="a peer a --dask worker serves besides the roster's members (repeatable)",
    )
    parser.add_argument(
        "--max-input-mb", type=float, default=64.0, help="largest task input accepted from a peer"
    )
    parser.add_argument(
        "--allow-from",
        default=None,
        help="comma-separated peer ids allowed to send tasks (default: the room)",
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds running tasks get to finish on shutdown"
    )
    parser.add_argument("--name", default="worker")
    parser.add_argument(
        "--report-package",
        action="append",
        default=[],
        metavar="NAME",
        help="a package whose installed version the agent card reports (repeatable), besides "
        "python, numpy, pandas, pyarrow and scikit-learn; tasks pick peers by it with requires=",
    )
    parser.add_argument(
        "--roster-owner",
        default=os.environ.get(environment.ROSTER_OWNER),
        help="peer id of the room owner whose signed roster decides who votes (default "
        "$SWARM_NOTEBOOK_ROSTER_OWNER, else the owner of the roster file in the profile)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop gracefully when the process that started this one dies "
        "(used by `swarm-notebook up`, so a killed launcher leaves no workers)",
    )
    parser.add_argument(
        "--store-mb",
        type=float,
        default=512,
        help="memory for resident data other peers put here (c.put); a put past it is "
        "refused with store-full",
    )
    parser.add_argument(
        "--spill-dir", type=Path, default=None, help="folder where resident data may spill"
    )
    parser.add_argument("--spill-mb", type=float, default=0, help="disk budget for --spill-dir")
    add_ice_arguments(parser)
    parser.add_argument("--log-level", default="WARNING")


def build_config(args: argparse.Namespace) -> CoordinatorConfig:
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    if args.dask and PYTHON_EXECUTION not in caps:
        caps.append(PYTHON_EXECUTION)
    if args.dask:
        parse_dask_address(args.dask)  # a bad address is a usage error, before joining
    for peer in args.allow:
        require_canonical(peer)
    executors = ExecutorConfig(
        python_execution="python-execution" in caps,
        workspace=args.workspace,
        git_repo=args.git_repo,
        llm_endpoint=args.llm_endpoint,
        llm_model=args.llm_model,
        sandbox_size=args.concurrency,
        sandbox_memory_limit_mb=args.memory_limit_mb,
        sandbox_session_idle_s=args.session_idle_timeout,
        unsafe_no_isolation=args.unsafe_no_isolation,
        dask=args.dask,
        dask_allow=frozenset(args.allow),
    )
    allowed = frozenset(p.strip() for p in args.allow_from.split(",")) if args.allow_from else None
    return CoordinatorConfig(
        room=args.room,
        signaling=args.signaling,
        secret=args.secret,
        ca_file=args.ca_file,
        profile=args.profile,
        name=args.name,
        concurrency=args.concurrency,
        capabilities=caps or None,
        executors=executors,
        policy=TaskPolicy(allowed_peers=allowed, max_input_bytes=int(args.max_input_mb * 2**20)),
        drain_grace_s=args.grace,
        roster_owner=args.roster_owner,
        mesh=mesh_with_ice(args),
        report_packages=list(args.report_package),
        store_bytes=int(args.store_mb * 2**20),
        store_spill_dir=args.spill_dir,
        store_spill_bytes=int(args.spill_mb * 2**20) if args.spill_dir is not None else 0,
    )


async def serve(args: argparse.Namespace) -> int:
    from swarm_notebook.client import join

    try:
        config = build_config(args)
    except (IceConfigError, UsageError, IdentityError) as exc:
        print(f"swarm-notebook worker: {exc.message}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Before connecting: a worker that cannot isolate must not join and then fail.
        await check_isolation(config.executors)
        coordinator = await join(
            args.room,
            signaling=args.signaling,
            secret=args.secret,
            profile=args.profile,
            config=config,
        )
    except (IceConfigError, SandboxUnavailable) as exc:
        print(f"swarm-notebook worker: {exc.message}", file=sys.stderr, flush=True)
        return 2
    stats = coordinator.get_stats()
    if stats.get("backend") == "dask":
        listed = len(config.executors.dask_allow)
        roster = len(stats["electorate"].get("members") or [])
        print(
            f"WARNING: --dask: other peers' code runs WITHOUT isolation on the Dask cluster "
            f"({stats['dask']['nthreads']} threads); serving only the allowlist: {listed} "
            f"--allow peer(s) and {roster} roster member(s)",
            file=sys.stderr,
            flush=True,
        )
    elif stats.get("isolation") == ISOLATION_NONE:
        print(
            "WARNING: --unsafe-no-isolation: other peers' code runs with your user rights",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"READY peer_id={coordinator.peer_id} room={args.room} "
        f"capabilities={','.join(stats['capabilities']) or '-'} "
        f"isolation={stats.get('isolation') or '-'} "
        f"backend={stats.get('backend') or '-'} "
        f"dask={(stats.get('dask') or {}).get('scheduler') or '-'}",
        flush=True,
    )
    watchdog = (
        asyncio.create_task(stop_when_orphaned(os.getppid(), stop, _say))
        if args.exit_with_parent
        else None
    )
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
    _say("stopping: finishing running tasks")
    await coordinator.leave()
    _say("stopped")
    return 0


def _say(line: str) -> None:
    # Whoever read our stdout may be gone (a killed launcher): status lines are optional.
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


def run(args: argparse.Namespace) -> int:
    if args.dask:
        # Dask logs at INFO by default, in this process and in the LocalCluster's
        # processes (which inherit the environment): keep it at the worker's level.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", args.log_level.lower())
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(args))
    except SignalingError as exc:
        # Refused, or an untrusted wss:// certificate: the message says what to change.
        print(f"swarm-notebook worker: {exc}", file=sys.stderr)
        return 1
