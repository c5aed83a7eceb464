"""``swarm-notebook up``: a whole local swarm with one command.

Starts a signaling server on 127.0.0.1 (port 8765, or a free one if that is taken), two
worker peers that run Python for this room only, and JupyterLab on 127.0.0.1 with
``quickstart.ipynb`` open. The room is protected by a secret made for this session, so
no peer from elsewhere can join it, and kernels find the signaling URL, room and secret
in ``SWARM_NOTEBOOK_*`` environment variables. Ctrl-C (or SIGTERM) stops JupyterLab,
then the workers (they finish running tasks), then the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

import swarm_notebook.environment as environment
from swarm_notebook.cli.ice_args import add_ice_arguments, mesh_with_ice
from swarm_notebook.coordinator.config import DEFAULT_ROOM
from swarm_notebook.errors import IceConfigError, RosterError, StartupError
from swarm_notebook.identity import Identity
from swarm_notebook.launcher import WORKER_GRACE_S, Child, say, start_worker
from swarm_notebook.membership.roster import Roster, load_roster, make_roster, save_roster
from swarm_notebook.signaling.config import DEFAULT_PORT, SignalingConfig
from swarm_notebook.signaling.server import SignalingServer

log = logging.getLogger(__name__)

DEFAULT_DIR = "~/swarm-notebook"
DEFAULT_LAB_PORT = 8888
FIRST_NOTEBOOK = "quickstart.ipynb"
LAB_READY_TIMEOUT_S = 120.0
LAB_STOP_TIMEOUT_S = 30.0
PACKAGE_EXAMPLES = Path(__file__).resolve().parents[1] / "notebook" / "examples"
REPO_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(DEFAULT_DIR),
        help=f"work folder for notebooks and profiles (default {DEFAULT_DIR})",
    )
    parser.add_argument("--workers", type=int, default=2, help="local worker peers (default 2)")
    parser.add_argument("--room", default=DEFAULT_ROOM)
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="signaling port; a free one is used if this one is taken",
    )
    parser.add_argument("--lab-port", type=int, default=DEFAULT_LAB_PORT)
    parser.add_argument("--no-lab", action="store_true", help="do not start JupyterLab")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    add_ice_arguments(parser)
    parser.add_argument("--log-level", default="WARNING")


def ice_environment(args: argparse.Namespace) -> dict[str, str]:
    """The ICE flags as the variables every started peer reads (validated here, at start)."""
    mesh = mesh_with_ice(args)
    env: dict[str, str] = {}
    if mesh.ice_servers is not None:
        env[environment.ICE_SERVERS] = json.dumps(mesh.ice_servers)
    if mesh.ice_policy is not None:
        env[environment.ICE_POLICY] = mesh.ice_policy
    return env


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.workers < 0:
        print("swarm-notebook up: --workers must be >= 0", file=sys.stderr)
        return 2
    try:
        args.ice_env = ice_environment(args)
    except IceConfigError as exc:
        print(f"swarm-notebook up: {exc.message}", file=sys.stderr)
        return 2
    workdir = Path(args.dir).expanduser().resolve()
    try:
        return asyncio.run(serve(args, workdir))
    except StartupError as exc:
        print(f"swarm-notebook up: {exc.message}", file=sys.stderr)
        return 1


# -- the work folder ------------------------------------------------------------------


def example_notebooks(search: tuple[Path, ...] = (PACKAGE_EXAMPLES, REPO_NOTEBOOKS)) -> list[Path]:
    """The example notebooks shipped with the package (or in a source checkout)."""
    for directory in search:
        found = sorted(directory.glob("*.ipynb"))
        if found:
            return found
    return []


def prepare_workdir(workdir: Path) -> list[str]:
    """Copy the examples the user does not have yet; never overwrite their edits."""
    workdir.mkdir(parents=True, exist_ok=True)
    copied = []
    for notebook in example_notebooks():
        target = workdir / notebook.name
        if not target.exists():
            shutil.copyfile(notebook, target)
            copied.append(notebook.name)
    return copied


def write_session_env(path: Path, env: dict[str, str]) -> None:
    """``source``-able variables of this session (owner-only: it holds the room secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        for key, value in sorted(env.items()):
            out.write(f"export {key}={value}\n")


# -- children -------------------------------------------------------------------------


async def start_signaling(host: str, port: int, secret: str) -> SignalingServer:
    """The server on ``port``, or on a free port if that one is taken (said aloud)."""
    server = SignalingServer(SignalingConfig(host=host, port=port, secret=secret))
    try:
        await server.start()
    except OSError as exc:
        if port == 0:
            raise StartupError(f"cannot start the signaling server: {exc}") from exc
        server = SignalingServer(SignalingConfig(host=host, port=0, secret=secret))
        await server.start()
        say(f"port {port} is busy; the signaling server uses port {server.port} instead")
    return server


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_for_lab(url: str, token: str, child: Child, log_path: Path) -> None:
    """Ask ``/api/status`` until JupyterLab answers (or exits, or time runs out)."""
    headers = {"Authorization": f"token {token}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LAB_READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            if child.proc.returncode is not None:
                raise StartupError(
                    f"JupyterLab exited with {child.proc.returncode}; see {log_path}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(
                    f"{url}/api/status", headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status == 200:
                        return
            # Nothing to wait on but the server's boot: ask again shortly.
            await asyncio.sleep(0.25)
    raise StartupError(
        f"JupyterLab did not answer within {LAB_READY_TIMEOUT_S:g} s; see {log_path}"
    )


async def start_lab(
    workdir: Path, port: int, env: dict[str, str], log_path: Path, open_browser: bool
) -> tuple[Child, str]:
    token = secrets.token_hex(24)
    if port == 0:
        port = free_port()
    elif not port_free(port):
        chosen = free_port()
        say(f"port {port} is busy; JupyterLab uses port {chosen} instead")
        port = chosen
    command = [
        sys.executable, "-m", "jupyterlab",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
        f"--LabApp.default_url=/lab/tree/{FIRST_NOTEBOOK}",
        f"--ServerApp.open_browser={open_browser}",
    ]  # fmt: skip
    if os.geteuid() == 0:  # containers often run as root
        command.append("--allow-root")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=log_file,
            stderr=log_file,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    child = Child("JupyterLab", proc)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for_lab(url, token, child, log_path)
    except BaseException:
        await child.stop(LAB_STOP_TIMEOUT_S, group=True)
        raise
    return child, f"{url}/lab/tree/{FIRST_NOTEBOOK}?token={token}"


# -- the session ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stop_signals() -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def serve(args: argparse.Namespace, workdir: Path) -> int:
    """Start everything, wait for Ctrl-C / SIGTERM (or JupyterLab exiting), stop in order.

    A signal during startup stops what was started so far: nothing is left running.
    """
    async with stop_signals() as stop, contextlib.AsyncExitStack() as stack:
        startup = asyncio.create_task(start_all(args, workdir, stack))
        stopped = asyncio.create_task(stop.wait())
        waiting: set[asyncio.Task[Any]] = {startup, stopped}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if startup in done:
            lab = startup.result()  # raises StartupError if something did not come up
            say("ready: press Ctrl-C to stop")
            if lab is not None:
                lab_ended = asyncio.create_task(lab.proc.wait())
                waiting = {lab_ended, stopped}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if lab_ended in done:
                    say(f"JupyterLab exited with {lab_ended.result()}; stopping")
                    code = 1
            else:
                await stopped
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        say("stopping: JupyterLab, then workers (they finish running tasks), then signaling")
    say("stopped")
    return code


def make_session_roster(state: Path, room: str, n_workers: int) -> Roster:
    """The notebook and the workers on one roster owned by the notebook's key, saved in
    every profile: the local swarm votes as members, and peers that join from elsewhere
    (with the secret) can still share and delegate but never vote."""
    profiles = {"notebook": state / "notebooks"}
    for i in range(1, n_workers + 1):
        profiles[f"local-worker-{i}"] = state / "workers" / f"worker-{i}"
    ids = {name: Identity.load_or_create(path) for name, path in profiles.items()}
    owner = ids["notebook"]
    members = {ident.peer_id: name for name, ident in ids.items()}
    try:
        previous = load_roster(profiles["notebook"], room)
    except RosterError:
        previous = None  # unreadable: replaced by a fresh one below
    if previous is not None and previous.owner == owner.peer_id:
        same = {m.peer_id: m.name for m in previous.members} == members
        version = previous.version + (0 if same else 1)
        roster = previous if same else make_roster(owner, room, members, version=version)
    else:
        roster = make_roster(owner, room, members)
    for path in profiles.values():
        save_roster(path, roster)
    return roster


async def start_all(
    args: argparse.Namespace, workdir: Path, stack: contextlib.AsyncExitStack
) -> Child | None:
    """Start server, workers and lab, registering each one's stop on ``stack`` at once."""
    state = workdir / ".swarm"
    secret = secrets.token_urlsafe(24)
    server = await start_signaling("127.0.0.1", args.port, secret)
    stack.push_async_callback(server.close)
    say(f"signaling  {server.url}  (room {args.room!r}, secret made for this session)")
    roster = make_session_roster(state, args.room, args.workers)
    say(f"roster     {len(roster.members)} voters (the notebook and its workers), notebook owns it")
    session = {
        # Every kernel (each example notebook has its own key) trusts that owner and gets
        # the roster from the workers, so its proposals go to the roster.
        environment.ROSTER_OWNER: roster.owner,
        environment.SIGNALING: server.url,
        environment.ROOM: args.room,
        environment.SECRET: secret,
        environment.ICE_HOSTS: "127.0.0.1",  # everything here is on this machine
        **getattr(args, "ice_env", {}),
    }
    env = {**os.environ, **session, "PYTHONUNBUFFERED": "1"}
    session_file = state / "session.env"
    write_session_env(session_file, session)
    stack.callback(session_file.unlink, missing_ok=True)

    workers: list[Child] = []

    async def stop_workers() -> None:
        codes = await asyncio.gather(*(w.stop(WORKER_GRACE_S) for w in workers))
        for worker, code in zip(workers, codes, strict=True):
            if code != 0:
                say(f"{worker.name} exited with {code}; see {state / 'logs'}")

    stack.push_async_callback(stop_workers)
    started = await asyncio.gather(
        *(
            start_worker(
                i,
                server.url,
                args.room,
                secret,
                state / "workers" / f"worker-{i}",
                state / "logs" / f"worker-{i}.log",
                env,
            )
            for i in range(1, args.workers + 1)
        ),
        return_exceptions=True,
    )
    workers.extend(w for w in started if isinstance(w, Child))
    failures = [w for w in started if isinstance(w, BaseException)]
    if failures:
        raise failures[0]
    for worker in workers:
        say(
            f"{worker.name:<15} {worker.info.get('peer_id', '?')[:16]}…  "
            f"{worker.info.get('capabilities', '-')}"
        )
    say(f"session    {session_file}  (source it to join from another terminal)")
    if args.no_lab:
        return None
    copied = prepare_workdir(workdir)
    if copied:
        say(f"notebooks  copied {', '.join(copied)} to {workdir}")
    lab_env = {**env, environment.PROFILE: str(state / "notebooks")}
    lab, url = await start_lab(
        workdir,
        args.lab_port,
        lab_env,
        state / "logs" / "lab.log",
        open_browser=not args.no_browser,
    )
    stack.push_async_callback(lab.stop, LAB_STOP_TIMEOUT_S, True)
    say(f"JupyterLab {url}")
    return lab
