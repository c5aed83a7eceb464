"""Signaling: a WebSocket server that admits key-proven peers into rooms and relays their
WebRTC offers, and the client that keeps a peer in its room across outages."""

from swarm_notebook.errors import (
    SignalingError,
    SignalingRefused,
    SignalingTimeout,
    SignalingTLSError,
    SignalingUnavailable,
)
from swarm_notebook.signaling.client import SignalingClient
from swarm_notebook.signaling.config import SignalingConfig, SignalingLimits
from swarm_notebook.signaling.server import SignalingServer

__all__ = [
    "SignalingClient",
    "SignalingConfig",
    "SignalingError",
    "SignalingLimits",
    "SignalingRefused",
    "SignalingServer",
    "SignalingTLSError",
    "SignalingTimeout",
    "SignalingUnavailable",
]
