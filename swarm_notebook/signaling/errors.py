"""Errors raised by the signaling client; ``reason`` is a short code from ``reasons``."""

from __future__ import annotations


class SignalingError(Exception):
    """Signaling failed; ``reason`` is a short code, ``message`` says why in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class SignalingRefused(SignalingError):
    """The server refused us for good (bad secret, bad key, replaced): retrying won't help."""


class SignalingUnavailable(SignalingError):
    """Not connected to the signaling server right now (the client keeps reconnecting)."""


class SignalingTimeout(SignalingError, TimeoutError):
    """Did not get (back) into the room in time."""
