"""The one error tree. Everything a user of swarm_notebook can meet is a ``SwarmError``.

Every error carries ``.reason`` (a :class:`~swarm_notebook.reasons.Reason`, or the plain
string a remote peer sent) and ``.message`` (what happened, in words). Branch on the class
or on ``.reason``, never on the message text.

::

    SwarmError
    ├── UsageError                 local misuse: bad arguments, unknown variable, ...
    │   ├── NotJoinedError         the coordinator is not (or no longer) in a swarm
    │   └── IceConfigError         ICE servers / policy that cannot be used
    ├── IdentityError              a key file or peer id that cannot be used
    ├── ProtocolError              a frame or message that breaks the protocol (ValueError)
    │   └── ValueCodecError        a value that cannot be encoded or decoded safely
    ├── SignalingError             the signaling server could not be used
    │   ├── SignalingRefused       refused for good (bad secret, bad key, replaced)
    │   ├── SignalingUnavailable   not connected right now (the client keeps trying)
    │   └── SignalingTimeout       not (back) in the room in time (TimeoutError)
    ├── TransportError             a peer link could not carry a request
    │   ├── PeerUnavailable        no authenticated link to that peer (ConnectionError)
    │   ├── RequestTimeout         no reply in time (TimeoutError)
    │   └── RemoteError            the peer answered with a refusal and a reason
    ├── DelegationError            a task could not be run by any peer
    │   ├── NoCapablePeerError     no connected peer offers what the task needs
    │   ├── UnknownTaskTypeError   no peer knows that task type (ValueError)
    │   └── RemoteTaskError        the task ran and failed; carries the remote traceback
    ├── TaskRefused                a task refused before it ran (executor or policy)
    ├── SandboxUnavailable         the sandbox could not start
    ├── CardError                  an agent card that is not acceptable (ValueError)
    ├── ReflectionRejected         a reflection that is refused (ValueError)
    ├── ConsensusError             a proposal, ballot or quorum that cannot be used (ValueError)
    │   └── ModificationRejected   a modification dict that cannot be assessed
    ├── AuditError                 an audit record that cannot be written (ValueError)
    └── FrameInputError            a record that does not fit a DataFrame view (ValueError)

``HandlerRefusal`` is raised by a message handler to answer a peer with a reason; it is a
``SwarmError`` too, but only ever seen by code that serves peers.

>>> try:
...     raise NoCapablePeerError(Reason.NO_CAPABLE_PEER, "no peer offers python-execution")
... except SwarmError as exc:
...     exc.reason
<Reason.NO_CAPABLE_PEER: 'no-capable-peer'>
"""

from __future__ import annotations

from swarm_notebook.reasons import Reason, is_reason


class SwarmError(Exception):
    """The root of every error swarm_notebook raises on purpose."""

    def __init__(self, reason: Reason | str, message: str = "") -> None:
        self.reason: Reason | str = Reason(reason) if is_reason(reason) else str(reason)
        self.message = message
        super().__init__(f"{self.reason}: {message}" if message else str(self.reason))

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a local traceback: the reason and the message are
        # the whole story for an error we raised on purpose.
        return [f"{type(self).__name__} [{self.reason}]: {self.message or self.reason}"]


class UsageError(SwarmError):
    """The swarm was used wrongly here (bad argument, unknown flag, unknown variable)."""


class NotJoinedError(UsageError):
    """The coordinator is not in a swarm (never joined, or it left: ``join()`` again)."""


class IceConfigError(UsageError, ValueError):
    """An ICE server list or policy that cannot be used (bad URL, TURN without credentials)."""


class IdentityError(SwarmError):
    """A key file or peer id that cannot be used."""


class ProtocolError(SwarmError, ValueError):
    """A frame or message that does not follow the protocol."""

    @property
    def detail(self) -> str:
        return self.message


class ValueCodecError(ProtocolError):
    """A value that cannot be encoded or decoded safely.

    Reasons: ``unsupported-type``, ``too-large``, ``too-deep``, ``malformed``,
    ``pickle-refused``.
    """


class SignalingError(SwarmError):
    """The signaling server could not be used."""


class SignalingRefused(SignalingError):
    """The server refused us for good (bad secret, bad key, replaced): retrying won't help."""


class SignalingUnavailable(SignalingError):
    """Not connected to the signaling server right now (the client keeps reconnecting)."""


class SignalingTimeout(SignalingError, TimeoutError):
    """Did not get (back) into the room in time."""


class TransportError(SwarmError):
    """A peer link could not carry a request."""


class PeerUnavailable(TransportError, ConnectionError):
    """The addressed peer has no authenticated link right now."""

    def __init__(self, message: str, reason: Reason | str = Reason.PEER_UNAVAILABLE) -> None:
        super().__init__(reason, message)


class RequestTimeout(TransportError, TimeoutError):
    """A request got no reply in time."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.TIMEOUT, message)


class RemoteError(TransportError):
    """The peer answered a request with a refusal: ``reason`` is the peer's code."""

    def __init__(self, peer_id: str, reason: Reason | str, message: str) -> None:
        super().__init__(reason, message)
        self.peer_id = peer_id

    def __str__(self) -> str:
        return f"peer {self.peer_id[:16]}: {self.reason}: {self.message}"


class HandlerRefusal(SwarmError):
    """Raised inside a message handler to answer the peer with a reason code."""


class DelegationError(SwarmError):
    """A task could not be run: no peer could take it, or every attempt failed."""


class NoCapablePeerError(DelegationError):
    """No connected peer offers the capabilities the task needs."""


class UnknownTaskTypeError(DelegationError, ValueError):
    """A task type no peer knows how to run."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.UNKNOWN_TASK_TYPE, message)


class RemoteTaskError(DelegationError):
    """A task ran on a peer and failed; the traceback shown is the remote one.

    >>> err = RemoteTaskError("ABCDEFGH" * 6, "t1", "ZeroDivisionError: division by zero",
    ...                       "Traceback...\\nZeroDivisionError: division by zero\\n")
    >>> err._render_traceback_()[0]
    'Remote traceback (peer ABCDEFGHABCDEFGH…, task t1):'
    """

    def __init__(
        self,
        peer: str | None,
        task_id: str | None,
        error: str,
        remote_traceback: str | None = None,
        error_type: str | None = None,
        peer_name: str | None = None,
    ) -> None:
        self.peer = peer
        self.task_id = task_id
        self.error = error
        self.remote_traceback = remote_traceback
        self.error_type = error_type or Reason.REMOTE_EXCEPTION
        self.peer_name = peer_name
        super().__init__(self.error_type, f"the task failed on peer {self.where}: {error}")

    @property
    def where(self) -> str:
        """``name (id…)`` when the peer has a name, else the shortened id."""
        short = short_id(self.peer)
        return f"{self.peer_name} ({short})" if self.peer_name else short

    def _render_traceback_(self) -> list[str]:
        lines = [f"Remote traceback (peer {self.where}, task {self.task_id}):"]
        if self.remote_traceback:
            lines.extend(self.remote_traceback.rstrip("\n").splitlines())
        lines.append(f"RemoteTaskError [{self.error_type}]: {self.message}")
        return lines


class TaskRefused(SwarmError):
    """A task refused before anything ran (bad input, oversize, policy, queue full)."""


class SandboxUnavailable(SwarmError, RuntimeError):
    """The sandbox could not be started (or cannot isolate on this machine)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SANDBOX_UNAVAILABLE, message)


class CardError(SwarmError, ValueError):
    """An agent card that is not acceptable."""


class ReflectionRejected(SwarmError, ValueError):
    """A reflection that is refused.

    Reasons: ``wrong-schema``, ``oversized``, ``bad-signature``, ``author-mismatch``,
    ``reserved-tag``, ``not-successful``, ``replayed``, ``rate-limited``, ``stale``,
    ``store-full``.
    """


class ConsensusError(SwarmError, ValueError):
    """A proposal, ballot or quorum that cannot be used."""


class ModificationRejected(ConsensusError):
    """A modification dict that cannot be assessed."""


class AuditError(SwarmError, ValueError):
    """An audit record that cannot be written."""


class FrameInputError(SwarmError, ValueError):
    """A record does not fit the documented shape of a DataFrame view."""

    @property
    def code(self) -> str:
        return str(self.reason)


def short_id(peer: str | None, width: int = 16) -> str:
    """A peer id cut for display.

    >>> short_id("A" * 52)
    'AAAAAAAAAAAAAAAA…'
    """
    if not peer:
        return "?"
    return peer if len(peer) <= width else peer[:width] + "…"


__all__ = [
    "AuditError",
    "CardError",
    "ConsensusError",
    "DelegationError",
    "FrameInputError",
    "HandlerRefusal",
    "IdentityError",
    "ModificationRejected",
    "NoCapablePeerError",
    "NotJoinedError",
    "PeerUnavailable",
    "ProtocolError",
    "ReflectionRejected",
    "RemoteError",
    "RemoteTaskError",
    "RequestTimeout",
    "SandboxUnavailable",
    "SignalingError",
    "SignalingRefused",
    "SignalingTimeout",
    "SignalingUnavailable",
    "SwarmError",
    "TaskRefused",
    "TransportError",
    "UnknownTaskTypeError",
    "UsageError",
    "ValueCodecError",
]
