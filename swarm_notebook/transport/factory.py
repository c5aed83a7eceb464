"""Builds a mesh transport bound to a signaling room."""

from __future__ import annotations

from swarm_notebook.identity import Identity
from swarm_notebook.signaling import SignalingClient
from swarm_notebook.transport.mesh import MeshConfig, MeshTransport, SignalingEvents


def mesh_transport(
    identity: Identity,
    signaling_url: str,
    room: str,
    *,
    secret: str | None = None,
    config: MeshConfig | None = None,
    ca_file: str | None = None,
    departure_grace: float = 5.0,
) -> MeshTransport:
    """A ``MeshTransport`` whose signaling client joins ``room`` at ``signaling_url``.

    ``ca_file`` trusts a ``wss://`` server's self-signed certificate (default:
    ``$SWARM_NOTEBOOK_CA_FILE``, then the system's authorities). ``departure_grace`` is
    how long a peer that left signaling still counts as a member (a peer whose socket
    merely dropped keeps its links).

    >>> transport = mesh_transport(Identity.generate(), "ws://127.0.0.1:8765/ws", "lab")
    """

    def make_client(events: SignalingEvents) -> SignalingClient:
        return SignalingClient(
            signaling_url,
            room,
            identity,
            secret,
            on_signal=events.signal_received,
            on_peer_joined=events.peer_joined,
            on_peer_left=events.peer_left,
            on_undeliverable=events.signal_undeliverable,
            on_ice_servers=events.set_issued_ice_servers,
            departure_grace=departure_grace,
            ca_file=ca_file,
        )

    return MeshTransport(identity, make_client, config)
