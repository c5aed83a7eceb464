"""``--ice-server``, ``--ice-username``, ``--ice-credential``, ``--ice-policy`` for peers."""

from __future__ import annotations

import argparse

from swarm_notebook.transport.ice_config import POLICIES, parse_servers, servers_from_urls
from swarm_notebook.transport.mesh import MeshConfig


def add_ice_arguments(parser: argparse.ArgumentParser) -> None:
    ice = parser.add_argument_group(
        "ICE (NAT traversal)",
        "peer-side settings win over $SWARM_NOTEBOOK_ICE_SERVERS / $SWARM_NOTEBOOK_ICE_POLICY,"
        " <profile>/ice.json and the servers the signaling server issues",
    )
    ice.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="stun:HOST[:PORT], turn:HOST[:PORT][?transport=tcp] or turns:HOST[:PORT] (repeatable)",
    )
    ice.add_argument("--ice-username", default=None, help="username for the TURN URLs")
    ice.add_argument(
        "--ice-credential", default=None, help="credential (password) for the TURN URLs"
    )
    ice.add_argument(
        "--ice-policy", choices=POLICIES, default=None, help="relay: use TURN relays only"
    )


def mesh_with_ice(args: argparse.Namespace, base: MeshConfig | None = None) -> MeshConfig:
    """``base`` with the ICE flags applied; raises ``IceConfigError`` for unusable ones."""
    mesh = base or MeshConfig()
    if args.ice_server:
        entries = servers_from_urls(args.ice_server, args.ice_username, args.ice_credential)
        parse_servers(entries, "--ice-server")
        mesh.ice_servers = entries
    if args.ice_policy is not None:
        mesh.ice_policy = args.ice_policy
    return mesh
