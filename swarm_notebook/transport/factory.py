"""Builds a mesh transport bound to a signaling room."""

from __future__ import annotations

from typing import Any

from swarm_notebook.identity import Identity
from swarm_notebook.signaling import SignalingClient
from swarm_notebook.transport.mesh import MeshConfig, MeshTransport


def mesh_transport(
    identity: Identity,
    signaling_url: str,
    room: str,
    *,
    secret: str | None = None,
    config: MeshConfig | None = None,
    ca_file: str | None = None,
) -> MeshTransport:
    """A ``MeshTransport`` whose signaling client joins ``room`` at ``signaling_url``.

    ``ca_file`` trusts a ``wss://`` server's self-signed certificate (default:
    ``$SWARM_NOTEBOOK_CA_FILE``, then the system's authorities).

    >>> transport = mesh_transport(Identity.generate(), "ws://127.0.0.1:8765/ws", "lab")
    """

    def make_client(on_signal: Any, on_peer_joined: Any, on_peer_left: Any) -> SignalingClient:
        return SignalingClient(
            signaling_url,
            room,
            identity,
            secret,
            on_signal=on_signal,
            on_peer_joined=on_peer_joined,
            on_peer_left=on_peer_left,
            ca_file=ca_file,
        )

    return MeshTransport(identity, make_client, config)
