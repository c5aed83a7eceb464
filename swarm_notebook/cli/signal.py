"""``swarm-notebook signal``: run a signaling server until SIGINT / SIGTERM.

The first line on stdout is ``signaling server listening on ws://HOST:PORT/ws`` (flushed),
so a parent process started with ``--port 0`` can read the URL.

With ``--certfile cert.pem --keyfile key.pem`` it serves ``wss://`` (use this whenever the
server is reachable beyond this machine: over plain ``ws://`` a recorded join proof lets an
eavesdropper guess the room secret offline). Clients trust a self-signed certificate with
``SWARM_NOTEBOOK_CA_FILE=cert.pem``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import swarm_notebook.environment as environment
from swarm_notebook._util.orphan import stop_when_orphaned
from swarm_notebook.errors import UsageError
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling.config import DEFAULT_PORT, SignalingConfig, SignalingLimits
from swarm_notebook.signaling.quotas import QuotaLimits
from swarm_notebook.signaling.server import SignalingServer
from swarm_notebook.signaling.turn_credentials import TurnConfig

_DEFAULT_LIMITS = SignalingLimits()
_DEFAULT_QUOTAS = QuotaLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument(
        "--secret",
        default=os.environ.get(environment.SIGNAL_SECRET),
        help=f"secret every room requires (default: ${environment.SIGNAL_SECRET})",
    )
    parser.add_argument(
        "--room-secret",
        action="append",
        default=[],
        metavar="ROOM=SECRET",
        help="a secret for one room (repeatable; overrides --secret for that room)",
    )
    ice = parser.add_argument_group("ICE servers handed to every admitted peer")
    ice.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="stun:HOST[:PORT]",
        help="a STUN server peers should use (repeatable)",
    )
    ice.add_argument(
        "--turn-url",
        action="append",
        default=[],
        metavar="turn:HOST[:PORT]",
        help="a TURN server sharing --turn-secret (repeatable; turn:...?transport=tcp, turns:)",
    )
    ice.add_argument(
        "--turn-secret",
        default=os.environ.get(environment.TURN_SECRET),
        help=f"coturn's static-auth-secret (default: ${environment.TURN_SECRET})",
    )
    ice.add_argument(
        "--turn-ttl", type=float, default=3600.0, help="seconds issued TURN credentials live"
    )
    tls = parser.add_argument_group("TLS (serve wss://)")
    tls.add_argument("--certfile", default=None, help="PEM certificate chain")
    tls.add_argument("--keyfile", default=None, help="PEM private key (default: in --certfile)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-frame-bytes", type=int, default=_DEFAULT_LIMITS.max_frame_bytes)
    limits.add_argument(
        "--rate",
        type=float,
        default=_DEFAULT_LIMITS.messages_per_second,
        help="messages per second per socket",
    )
    limits.add_argument("--burst", type=int, default=_DEFAULT_LIMITS.burst)
    limits.add_argument("--peers-per-room", type=int, default=_DEFAULT_LIMITS.peers_per_room)
    limits.add_argument("--max-rooms", type=int, default=_DEFAULT_LIMITS.max_rooms)
    limits.add_argument("--max-room-length", type=int, default=_DEFAULT_LIMITS.max_room_length)
    limits.add_argument("--max-connections", type=int, default=_DEFAULT_LIMITS.max_connections)
    limits.add_argument(
        "--join-timeout",
        type=float,
        default=_DEFAULT_LIMITS.join_timeout,
        help="seconds a socket may take to join before it is closed",
    )
    quotas = parser.add_argument_group("limits per remote address (IPv6: per /64)")
    quotas.add_argument(
        "--connections-per-address", type=int, default=_DEFAULT_QUOTAS.connections_per_address
    )
    quotas.add_argument(
        "--pending-per-address",
        type=int,
        default=_DEFAULT_QUOTAS.pending_per_address,
        help="sockets that have not joined yet",
    )
    quotas.add_argument(
        "--rooms-per-address",
        type=int,
        default=_DEFAULT_QUOTAS.rooms_per_address,
        help="open rooms one address created",
    )
    quotas.add_argument(
        "--peers-per-room-per-address",
        type=int,
        default=_DEFAULT_QUOTAS.peers_per_room_per_address,
    )
    quotas.add_argument(
        "--secret-failures",
        type=int,
        default=_DEFAULT_QUOTAS.secret_failures,
        help="wrong room secrets in a row before the address is locked out",
    )
    quotas.add_argument(
        "--lockout",
        type=float,
        default=_DEFAULT_QUOTAS.lockout_base,
        help="first lockout in seconds; each further one doubles",
    )
    quotas.add_argument(
        "--lockout-max", type=float, default=_DEFAULT_QUOTAS.lockout_max, help="longest lockout"
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one dies "
        "(used by `swarm_notebook.local()`, so a killed kernel leaves no server behind)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (stderr)")


def config_from_args(args: argparse.Namespace) -> SignalingConfig:
    """Build the server config; raises ``UsageError`` with a clear message on bad input."""
    room_secrets: dict[str, str] = {}
    for item in args.room_secret:
        room, sep, secret = item.partition("=")
        if not sep or not room or not secret:
            raise UsageError(
                Reason.BAD_ARGUMENTS, f"--room-secret expects ROOM=SECRET, got {item!r}"
            )
        room_secrets[room] = secret
    limits = SignalingLimits(
        max_frame_bytes=args.max_frame_bytes,
        messages_per_second=args.rate,
        burst=args.burst,
        peers_per_room=args.peers_per_room,
        max_rooms=args.max_rooms,
        max_room_length=args.max_room_length,
        max_connections=args.max_connections,
        join_timeout=args.join_timeout,
        per_address=QuotaLimits(
            connections_per_address=args.connections_per_address,
            pending_per_address=args.pending_per_address,
            rooms_per_address=args.rooms_per_address,
            peers_per_room_per_address=args.peers_per_room_per_address,
            secret_failures=args.secret_failures,
            lockout_base=args.lockout,
            lockout_max=args.lockout_max,
        ),
    )
    turn = TurnConfig(
        urls=tuple(args.turn_url),
        secret=args.turn_secret or None,
        ttl_s=args.turn_ttl,
        stun_urls=tuple(args.ice_server),
    )
    return SignalingConfig(
        host=args.host,
        port=args.port,
        secret=args.secret or None,
        room_secrets=room_secrets,
        limits=limits,
        turn=turn if turn.enabled else None,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )


async def serve(config: SignalingConfig, exit_with_parent: bool = False) -> None:
    """Run the server until SIGINT or SIGTERM (or its parent dies), then shut it down."""
    server = SignalingServer(config)
    await server.start()  # a certificate that cannot be loaded raises ValueError here
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    watchdog = (
        asyncio.create_task(stop_when_orphaned(os.getppid(), stop)) if exit_with_parent else None
    )
    try:
        print(f"signaling server listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.close()
    print("signaling server stopped", flush=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except UsageError as exc:
        print(f"swarm-notebook signal: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the server's own limits (SignalingConfig)
        print(f"swarm-notebook signal: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.exit_with_parent))
    except ValueError as exc:  # e.g. an unreadable certificate or key
        print(f"swarm-notebook signal: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(
            f"swarm-notebook signal: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
