"""``%swarm`` and ``%%swarm run``: the swarm from notebook cells.

    %load_ext swarm_notebook
    %swarm join lab --signaling ws://127.0.0.1:8765/ws
    %%swarm run --push df --pull summary
    summary = df.describe()
    summary.loc["mean"]

Magics are synchronous, so a running cell blocks the kernel's loop; the task itself runs
on the coordinator's network thread, and the cell waits on its future while a progress
line shows which peer has it, its state and how long it has taken.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.magic import Magics, line_cell_magic, magics_class
from packaging.requirements import InvalidRequirement, Requirement

import swarm_notebook.environment as environment
from swarm_notebook.coordinator.config import DEFAULT_ROOM, DEFAULT_SIGNALING
from swarm_notebook.errors import (
    AttemptsExhausted,
    DelegationError,
    NoCapablePeerError,
    RefError,
    RemoteTaskError,
    SessionLostError,
    SwarmError,
    UsageError,
    short_id,
)
from swarm_notebook.notebook.handle import RemoteRun, TaskHandle, TaskProgress
from swarm_notebook.notebook.progress import (
    DisplayProgress,
    HandleDisplay,
    ProgressLine,
    ProgressView,
    StreamProgress,
    show_output,
    summary,
    wait_with_progress,
)
from swarm_notebook.notebook.session import SwarmSession
from swarm_notebook.reasons import Reason

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from swarm_notebook.client import Coordinator
    from swarm_notebook.sessions import RemoteSession
    from swarm_notebook.workload.refs import RemoteRef

TASK_TYPE = "python-computation"
PYTHON_EXECUTION = "python-execution"
CARD_WAIT_S = 10.0  # how long --requires waits for the cards of just-connected peers
SUBCOMMANDS = (
    "join",
    "local",
    "status",
    "peers",
    "tasks",
    "dashboard",
    "doctor",
    "leave",
    "roster",
)


JOIN_DESCRIPTION = (
    "Join a room of the swarm through its signaling server. No server yet? "
    "`%swarm local 2` starts one with two workers from this kernel, or run "
    "`swarm-notebook up` (or `swarm-notebook signal`) in a terminal."
)


class _HelpShown(Exception):
    """``-h`` printed the usage: nothing else to do."""


class MagicArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a ``UsageError`` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        # format_usage() already starts with "usage: ".
        raise UsageError(Reason.BAD_ARGUMENTS, f"{message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _HelpShown()


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not name.isidentifier():
            raise argparse.ArgumentTypeError(f"{name!r} is not a Python variable name")
    return names


def _name(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def _package_version(text: str) -> tuple[str, str]:
    """``pandas>=2.2`` as ``("pandas", ">=2.2")``, the form ``requires=`` takes."""
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        requirement = None
    if requirement is None or not str(requirement.specifier) or requirement.marker:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a package with a version specifier, e.g. 'pandas>=2.2'"
        )
    return requirement.name, str(requirement.specifier)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0 seconds")
    return value


def build_parser(env: dict[str, str]) -> MagicArgumentParser:
    """Parser of ``%swarm`` lines; defaults come from the ``SWARM_NOTEBOOK_*`` variables."""
    parser = MagicArgumentParser(prog="%swarm", add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)
    sub.required = True
    join = sub.add_parser("join", help="join a room", description=JOIN_DESCRIPTION)
    join.add_argument(
        "room",
        nargs="?",
        default=env.get(environment.ROOM) or DEFAULT_ROOM,
        help=f"room to join (default: ${environment.ROOM}, else {DEFAULT_ROOM!r})",
    )
    join.add_argument(
        "--signaling",
        default=env.get(environment.SIGNALING) or None,
        metavar="URL",
        help=f"signaling server, ws://host:port[/ws] or wss://... (default: "
        f"${environment.SIGNALING}, else {DEFAULT_SIGNALING})",
    )
    join.add_argument(
        "--secret",
        default=env.get(environment.SECRET) or None,
        help=f"the room's secret, if its server wants one (default: ${environment.SECRET}; "
        "the variable keeps it out of the notebook)",
    )
    join.add_argument(
        "--name",
        default=None,
        help="the name other peers see (default: your user name and this notebook's name)",
    )
    join.add_argument(
        "--caps",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=None,
        help="capabilities to offer, comma-separated",
    )
    join.add_argument("--profile", type=Path, default=None, help="profile folder (key, stores)")
    join.add_argument(
        "--settle", type=float, default=10.0, help="seconds to wait for the room's peers to connect"
    )
    join.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help=f"a STUN or TURN server, stun:HOST:3478 / turn:HOST:3478 (repeatable; default: "
        f"${environment.ICE_SERVERS}, else the profile's ice.json, else what the server issues)",
    )
    join.add_argument("--ice-username", default=None, help="TURN user name")
    join.add_argument("--ice-credential", default=None, help="TURN password")
    join.add_argument(
        "--ice-policy",
        choices=("all", "relay"),
        default=None,
        help=f"relay: only TURN-relayed links (default: ${environment.ICE_POLICY}, else all)",
    )
    local = sub.add_parser(
        "local",
        help="start a signaling server and N workers from this kernel, and join them",
        description="The zero-configuration swarm: a signaling server and N sandboxed "
        "workers as child processes of this kernel, a room secret made for them; "
        "`%swarm leave` (or the kernel exiting) stops them all.",
    )
    local.add_argument("workers", nargs="?", type=int, default=2, help="workers (default 2)")
    local.add_argument("--name", default=None, help="the name other peers see")
    for name, text in (
        ("status", "state and counters"),
        ("peers", "peers as a DataFrame"),
        ("tasks", "tasks as a DataFrame"),
        ("dashboard", "the live panel"),
        ("doctor", "check signaling, STUN/TURN, the NAT and every link"),
        ("leave", "leave the swarm"),
    ):
        sub.add_parser(name, help=text)
    put = sub.add_parser(
        "put",
        help="keep a variable on a peer (a RemoteRef); --push of it then reuses the ref",
    )
    put.add_argument("variable", type=_name, help="the variable to keep remotely")
    put.add_argument("--peer", default=None, help="peer id (or a unique prefix of one)")
    put.add_argument("--replicas", type=int, default=1, help="peers keeping a copy (default 1)")
    roster = sub.add_parser("roster", help="who may vote: show | add ID [--name N] | remove ID")
    roster.add_argument("action", nargs="?", choices=("show", "add", "remove"), default="show")
    roster.add_argument("peer_id", nargs="?", default=None)
    roster.add_argument("--name", default="")
    run = sub.add_parser("run", help="(cell magic) run the cell on a capable peer")
    target = run.add_mutually_exclusive_group()
    target.add_argument(
        "--requires",
        action="append",
        default=[],
        metavar="CAP",
        help="capability the peer must offer besides python-execution",
    )
    target.add_argument("--peer", default=None, help="peer id (or a unique prefix of one)")
    run.add_argument(
        "--needs",
        action="append",
        type=_package_version,
        default=[],
        metavar="PKG_SPEC",
        help="a package version the peer must have, e.g. 'pandas>=2.2' (repeatable; "
        "requires= of c.submit)",
    )
    run.add_argument("--push", type=_names, default=[], help="variables to send: a,b")
    run.add_argument("--pull", type=_names, default=[], help="variables to bring back: x,y")
    run.add_argument("--timeout", type=_positive, default=None, help="seconds")
    run.add_argument("--no-wait", action="store_true", help="return a handle at once")
    run.add_argument(
        "--session",
        default=None,
        metavar="NAME",
        help="run in the named session: its variables stay on its peer between cells",
    )
    run.add_argument(
        "--as",
        dest="handle_name",
        type=_name,
        default=None,
        metavar="NAME",
        help="with --no-wait: also store the handle in this variable (e.g. --as h)",
    )
    return parser


@magics_class
class SwarmMagics(Magics):
    """``%swarm join|status|peers|tasks|dashboard|leave`` and ``%%swarm run``."""

    def __init__(self, shell: InteractiveShell, session: SwarmSession) -> None:
        super().__init__(shell)
        self.session = session
        # Variables put with `%swarm put`: `--push NAME` sends the ref while the value is
        # unchanged (same content hash), and puts the new value when it changed.
        self.refs: dict[str, RemoteRef] = {}

    @line_cell_magic
    def swarm(self, line: str, cell: str | None = None) -> Any:
        """Work with the swarm; ``%swarm -h`` lists the commands."""
        import os

        parser = build_parser(dict(os.environ))
        if not line.strip() and cell is None:
            # A bare %swarm is a question, not a mistake: answer with the help.
            print(parser.format_help())
            return None
        try:
            args = parser.parse_args(shlex.split(line))
        except _HelpShown:
            return None
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(Reason.BAD_ARGUMENTS, str(exc)) from None
        if args.command == "run":
            if cell is None:
                raise UsageError(Reason.BAD_ARGUMENTS, "run is a cell magic: use %%swarm run")
            return self._run(args, cell)
        if cell is not None:
            raise UsageError(
                Reason.BAD_ARGUMENTS,
                f"%%swarm takes only `run`; use %swarm {args.command} on a line",
            )
        command: Callable[[argparse.Namespace], Any] = getattr(self, f"_{args.command}")
        return command(args)

    # -- line commands -----------------------------------------------------------------

    def _join(self, args: argparse.Namespace) -> None:
        from swarm_notebook.transport.ice_config import servers_from_urls

        signaling = args.signaling or DEFAULT_SIGNALING
        ice_servers = (
            servers_from_urls(args.ice_server, args.ice_username, args.ice_credential)
            if args.ice_server
            else None
        )
        coordinator, missing = self.session.join(
            args.room, signaling=signaling, secret=args.secret, capabilities=args.caps,
            profile=args.profile, settle_s=args.settle,
            ice_servers=ice_servers, ice_policy=args.ice_policy, name=args.name,
        )  # fmt: skip
        print_joined(coordinator, args.room, coordinator.signaling)
        if missing:
            print(
                f"still connecting to {len(missing)} peer(s) after {args.settle:g} s: "
                + ", ".join(short_id(m) for m in missing),
                file=sys.stderr,
            )

    def _local(self, args: argparse.Namespace) -> None:
        coordinator = self.session.local(args.workers, name=args.name)
        print_joined(coordinator, coordinator.room, coordinator.signaling)
        print("local swarm: its server and workers stop with `%swarm leave` or this kernel")

    def _status(self, args: argparse.Namespace) -> Any:
        coordinator = self.session.require()
        status = coordinator.get_status()
        print(
            f"{status['state']} · {status['primary_metric']} · {status['secondary_metric']} · "
            f"room {self.session.room!r} · peer {short_id(coordinator.peer_id)}"
        )
        return coordinator.stats_frame()

    def _peers(self, args: argparse.Namespace) -> Any:
        return self.session.require().peers_frame()

    def _tasks(self, args: argparse.Namespace) -> Any:
        return self.session.require().tasks_frame()

    def _dashboard(self, args: argparse.Namespace) -> Any:
        coordinator = self.session.require()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError(
                Reason.NO_KERNEL,
                "the dashboard needs a Jupyter kernel (JupyterLab, Notebook, VS Code)",
            ) from None
        return coordinator.dashboard()

    def _doctor(self, args: argparse.Namespace) -> None:
        from swarm_notebook.notebook.session import run_blocking
        from swarm_notebook.views.doctor import render

        checks = run_blocking(self.session.require().doctor(), timeout=60)
        print(render(checks))

    def _leave(self, args: argparse.Namespace) -> None:
        room = self.session.room
        if self.session.leave():
            print(f"left room {room!r}")
        else:
            print("not in a swarm: nothing to leave")

    def _put(self, args: argparse.Namespace) -> RemoteRef:
        from swarm_notebook.notebook.session import run_blocking

        coordinator = self.session.require()
        user_ns = self.shell.user_ns if self.shell is not None else {}
        if args.variable not in user_ns:
            raise UsageError(
                Reason.UNKNOWN_VARIABLE, f"there is no variable {args.variable!r} to put"
            )
        peer = self._target(coordinator, args) if args.peer else None
        ref = run_blocking(
            coordinator.put(user_ns[args.variable], peer=peer, replicas=args.replicas)
        )
        self.refs[args.variable] = ref
        holders = ", ".join(coordinator.peer_name(h) or h[:8] for h in ref.holders)
        print(f"{args.variable}: ref {ref.ref_id[:8]} ({ref.size} bytes) on {holders}")
        return ref

    def _pushed(self, coordinator: Coordinator, name: str, value: Any) -> Any:
        """What `--push name` sends: the variable's ref if it was put, else the value."""
        from swarm_notebook.notebook.session import run_blocking

        ref = self.refs.get(name)
        if ref is None:
            return value
        fresh = run_blocking(coordinator.put(value, reuse=True))
        if fresh.ref_id != ref.ref_id:
            self.refs[name] = fresh
            try:
                run_blocking(coordinator.release(ref))
            except RefError:
                pass  # already released (or left with its coordinator): nothing to free
        return fresh

    def _roster(self, args: argparse.Namespace) -> None:
        """Show the room's roster, or change it (this peer must own it, or make it)."""
        from swarm_notebook.notebook.session import run_blocking

        coordinator = self.session.require()
        if args.action != "show":
            if not args.peer_id:
                raise UsageError(Reason.BAD_ARGUMENTS, f"%swarm roster {args.action} PEER_ID")
            if args.action == "add":
                change = coordinator.roster_add(args.peer_id, args.name)
            else:
                change = coordinator.roster_remove(args.peer_id)
            run_blocking(change, timeout=30)  # a refusal is a SwarmError with its reason
        info = coordinator.roster()
        if info["electorate"] == "open":
            print("open room: no roster (anyone connected votes; high-risk changes are refused)")
        else:
            print(f"roster v{info['version']} owned by {short_id(info['owner'])}:")
            for member in info["members"]:
                print(f"  {short_id(member['peer_id'])}  {member['name']}")

    # -- %%swarm run ---------------------------------------------------------------------

    def _run(self, args: argparse.Namespace, cell: str) -> Any:
        coordinator = self.session.require()
        user_ns = self.shell.user_ns if self.shell is not None else {}
        missing = [name for name in args.push if name not in user_ns]
        if missing:
            raise UsageError(
                Reason.UNKNOWN_VARIABLE,
                f"--push names variables that do not exist: {', '.join(missing)}",
            )
        if args.handle_name and not args.no_wait:
            raise UsageError(Reason.BAD_ARGUMENTS, "--as names the handle of --no-wait")
        peer = self._target(coordinator, args)
        inputs = {name: self._pushed(coordinator, name, user_ns[name]) for name in args.push}
        # The %%swarm line is line 1 of the cell: a blank first line keeps the remote
        # traceback's line numbers those of the cell.
        code = "\n" + cell
        requires = dict(args.needs) or None
        session = (
            coordinator.session(args.session, peer=peer, requires=requires)
            if args.session
            else None
        )
        if session is not None:
            data = session.data(code, inputs, list(args.pull))
            peer = session.peer
        else:
            data = {"code": code, "inputs": inputs, "outputs": list(args.pull)}
        run = RemoteRun(
            coordinator, TASK_TYPE, data, timeout=args.timeout, peer=peer, requires=requires
        )
        # --no-wait in Jupyter: the handle's own output is the one progress line, updated
        # when the task ends (a separate line said "completed" above a stale handle).
        view = self._progress_view(live_handle=args.no_wait)

        def finish(future: concurrent.futures.Future[dict[str, Any]]) -> Any:
            return self._finish(future, run, args, peer, view, quiet=args.no_wait, session=session)

        if args.no_wait:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            handle = TaskHandle(run, finish, loop=loop, display=view)
            if args.handle_name and self.shell is not None:
                self.shell.user_ns[args.handle_name] = handle
            return handle
        try:
            wait_with_progress(run, view)
        except KeyboardInterrupt:
            raise SwarmError(Reason.CANCELED, "interrupted: the task was canceled") from None
        return finish(run.future)

    def _progress_view(self, *, live_handle: bool = False) -> ProgressView:
        if getattr(self.shell, "kernel", None) is not None:
            return HandleDisplay(TASK_TYPE) if live_handle else DisplayProgress(TASK_TYPE)
        return StreamProgress(TASK_TYPE)

    def _target(self, coordinator: Coordinator, args: argparse.Namespace) -> str | None:
        """The peer to use, or None to let the coordinator choose (and fail over)."""
        peers = coordinator.get_stats()["peers"]
        connected = [p for p in peers if p["state"] == "connected"]
        if args.peer:
            matches = [p["id"] for p in peers if p["id"].startswith(args.peer)]
            live = [p["id"] for p in connected if p["id"].startswith(args.peer)]
            if len(live) > 1:
                raise UsageError(
                    Reason.AMBIGUOUS_PEER,
                    f"{args.peer!r} matches {len(live)} peers; give more of the id",
                )
            if not live:
                what = "is gone" if matches else "is not in this room"
                raise UsageError(
                    Reason.PEER_GONE, f"peer {args.peer!r} {what}.\n{describe_peers(connected)}"
                )
            return str(live[0])
        if not args.requires:
            # The coordinator chooses, waiting (with a progress line) for a capable peer's
            # card if the links are younger than their cards, and fails over.
            return None
        needed = {PYTHON_EXECUTION, *args.requires}
        capable = [p for p in connected if needed <= set(p["capabilities"])]
        if not capable:
            from swarm_notebook.notebook.session import run_blocking

            # Cards may still be on their way right after a join: wait for them (bounded).
            run_blocking(coordinator.settle(CARD_WAIT_S), timeout=CARD_WAIT_S + 10)
            connected = [p for p in coordinator.get_stats()["peers"] if p["state"] == "connected"]
            capable = [p for p in connected if needed <= set(p["capabilities"])]
        if not capable:
            raise NoCapablePeerError(
                Reason.NO_CAPABLE_PEER,
                f"no connected peer offers {', '.join(sorted(needed))}.\n"
                + describe_peers(connected),
            )
        # Extra requirements are the notebook's choice: pick the least-loaded such peer.
        return str(min(capable, key=lambda p: (p["load"], p["id"]))["id"])

    def _finish(
        self,
        future: concurrent.futures.Future[dict[str, Any]],
        run: RemoteRun,
        args: argparse.Namespace,
        peer: str | None,
        view: ProgressView,
        *,
        quiet: bool,
        session: RemoteSession | None = None,
    ) -> Any:
        try:
            result = future.result(0)
        except concurrent.futures.CancelledError:
            view.finish(ProgressLine(f"✖ canceled after {run.elapsed():.1f} s", "failed"))
            raise SwarmError(Reason.CANCELED, "the task was canceled") from None
        except Exception as exc:
            lost = session.translate(exc, None) if session is not None else exc
            error = lost if isinstance(lost, SessionLostError) else delegation_error(exc, peer)
            view.finish(ProgressLine(f"✖ {error.reason}: {error.message}", "failed"))
            raise error from None
        final = TaskProgress(
            result.get("task_id"), result.get("peer"), str(result.get("state")),
            int(result.get("attempts") or 0), float(result.get("duration_s") or run.elapsed()),
            run.coordinator.peer_name(result.get("peer")),
        )  # fmt: skip
        if not quiet:
            # What did not arrive live (the last batch, or all of it without streaming).
            show_output(run.new_output(final=result), view)
        view.finish(summary(final, final.state, TASK_TYPE))
        if not result.get("success") and session is not None:
            lost = session.translate(RemoteTaskError(None, None, ""), result)
            if isinstance(lost, SessionLostError):
                raise lost
        if not result.get("success"):
            raise RemoteTaskError(
                result.get("peer"), result.get("task_id"), str(result.get("error")),
                result.get("traceback"), result.get("error_type"), final.peer_name,
            )  # fmt: skip
        outputs = result.get("outputs") or {}
        if self.shell is not None:
            pulled = {name: outputs[name] for name in args.pull if name in outputs}
            self.shell.user_ns.update(pulled)
        if result.get("value_error"):
            print(f"the value did not travel back: {result['value_error']}", file=sys.stderr)
            return RemoteRepr(str(result.get("value_repr")))
        return result.get("value")


class RemoteRepr:
    """The repr of a remote value that could not be sent back (shown instead of it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def peer_label(peer: dict[str, Any]) -> str:
    """``name (id…)`` for a peer row of ``get_stats()``, the id alone without a card.

    >>> peer_label({"id": "A" * 52, "name": "worker-1"})
    'worker-1 (AAAAAAAAAAAAAAAA…)'
    """
    name = peer.get("name")
    return f"{name} ({short_id(peer['id'])})" if name else short_id(peer["id"])


def print_joined(coordinator: Coordinator, room: str, signaling: str) -> None:
    """What ``%swarm join`` (and ``%swarm local``) says: who we are and who is there."""
    stats = coordinator.get_stats()
    me = coordinator.peer_name(coordinator.peer_id) or coordinator.name
    print(
        f"joined room {room!r} as {me} ({short_id(coordinator.peer_id)}) via {signaling}: "
        f"{stats['connected_peers']} peer(s) connected"
    )
    for peer in stats["peers"]:
        caps = ", ".join(peer["capabilities"]) or "no capabilities"
        print(f"  {peer_label(peer)}  {peer['state']:<10} {caps}")


def describe_peers(peers: list[dict[str, Any]]) -> str:
    """Connected peers and what they offer, for error messages.

    >>> print(describe_peers([{"id": "A" * 52, "capabilities": ["git-vfs"], "load": 0.0}]))
    connected peers:
      AAAAAAAAAAAAAAAA…  git-vfs (load 0%)
    """
    if not peers:
        return "no peers are connected (are workers running? try `%swarm peers`)"
    lines = ["connected peers:"]
    for peer in peers:
        caps = ", ".join(peer["capabilities"]) or "no capabilities"
        lines.append(f"  {peer_label(peer)}  {caps} (load {peer.get('load', 0):.0%})")
    return "\n".join(lines)


def delegation_error(exc: BaseException, peer: str | None) -> SwarmError:
    """A coordinator failure as the error the cell shows; decided by class, never by text."""
    if isinstance(exc, AttemptsExhausted) and peer is not None:
        # The one peer the cell was pinned to did not answer or went away.
        return DelegationError(
            Reason.PEER_GONE, f"peer {short_id(peer)} went away before finishing: {exc.message}"
        )
    if isinstance(exc, SwarmError):
        return exc  # already says what happened, with a reason (DelegationError, UsageError...)
    return DelegationError(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
