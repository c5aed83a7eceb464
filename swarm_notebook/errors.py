"""The one error tree. Everything a user of swarm_notebook can meet is a ``SwarmError``.

Every error carries ``.reason`` (a :class:`~swarm_notebook.reasons.Reason`, or the plain
string a remote peer sent) and ``.message`` (what happened, in words). Branch on the class
or on ``.reason``, never on the message text.

::

    SwarmError
    ├── UsageError                 local misuse: bad arguments, unknown variable, ...
    │   ├── NotJoinedError         the coordinator is not (or no longer) in a swarm
    │   ├── UnknownTaskTypeError   no task type of that name exists (ValueError)
    │   ├── TaskInputError         task data that cannot be sent as it is (ValueError)
    │   ├── UnknownSuiteError      ``bench --only`` named a suite that does not exist
    │   ├── IceConfigError         ICE servers / policy that cannot be used
    │   └── SignalingURLError      a signaling URL that cannot work (not ws:// or wss://)
    ├── IdentityError              a key file or peer id that cannot be used
    ├── ProtocolError              a frame or message that breaks the protocol (ValueError)
    │   └── ValueCodecError        a value that cannot be encoded or decoded safely
    ├── SignalingError             the signaling server could not be used
    │   ├── SignalingRefused       refused for good (bad secret, bad signature, bad id)
    │   ├── SignalingUnavailable   not connected right now (the client keeps trying)
    │   ├── SignalingTLSError      wss:// certificate not trusted / TLS handshake failed
    │   └── SignalingTimeout       not (back) in the room in time (TimeoutError)
    ├── TransportError             a peer link could not carry a request
    │   ├── PeerUnavailable        no authenticated link to that peer (ConnectionError)
    │   ├── RequestTimeout         no reply in time (TimeoutError)
    │   └── RemoteError            the peer answered with a refusal and a reason
    ├── DelegationError            no peer could run the task
    │   ├── NoCapablePeerError     no connected peer offers what the task needs
    │   ├── TaskRefused            refused before it ran (policy, limits, bad input, busy)
    │   ├── AttemptsExhausted      every peer tried refused it, went away or did not answer
    │   └── DelegationTimeout      no capable peer had room in time (TimeoutError)
    ├── RemoteTaskError            a cell ran on a peer and raised; carries the remote traceback
    ├── RefError                   a ref: unknown, released, another peer's, lost, store-full
    ├── WaitTimeout                peers or a task did not arrive in time (TimeoutError)
    ├── EnvironmentMismatchWarning a peer's numpy / pandas major.minor differ (UserWarning)
    ├── SandboxUnavailable         the sandbox could not start
    ├── CardError                  an agent card that is not acceptable (ValueError)
    ├── RosterError                a room roster that cannot be used (ValueError)
    ├── ReflectionRejected         a reflection that is refused (ValueError)
    ├── ConsensusError             a proposal, ballot or quorum that cannot be used (ValueError)
    │   └── ModificationRejected   a modification dict that cannot be assessed
    ├── AuditError                 an audit record that cannot be written (ValueError)
    ├── FrameInputError            a record that does not fit a DataFrame view (ValueError)
    ├── StartupError               ``swarm-notebook up`` could not start something (RuntimeError)
    └── BenchError                 a benchmark could not be measured (RuntimeError)
        ├── MetricError            a metric with no, non-finite or duplicate samples
        └── LeftoverProcessesError a benchmark left processes behind

``delegate_task`` follows one rule: it *returns* the result dict for anything a peer ran
and reported (``success`` True, or False with the user's own error), raises a
``DelegationError`` when no peer could run the task, and a ``UsageError`` for misuse that
is caught here before any peer is asked.

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

    def __init__(self, message: str, reason: Reason | str = Reason.NOT_JOINED) -> None:
        super().__init__(reason, message)


class UnknownTaskTypeError(UsageError, ValueError):
    """A task type no peer knows how to run (a typo, usually)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.UNKNOWN_TASK_TYPE, message)


class TaskInputError(UsageError, ValueError):
    """Task data that cannot be sent as it is (wrong shape, not encodable, over the limit)."""


class UnknownSuiteError(UsageError, ValueError):
    """``swarm-notebook bench --only`` named a suite that does not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.UNKNOWN_SUITE, message)


class IceConfigError(UsageError, ValueError):
    """An ICE server list or policy that cannot be used (bad URL, TURN without credentials)."""


class TransportBackendError(UsageError, ValueError):
    """A transport backend that is unknown or not installed (``native`` needs its extra)."""


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
    """The server refused us for good (bad secret, bad signature, bad id): retrying won't help.

    Not ``replaced``: that one is retried (another holder of our key must not keep our place).
    """


class SignalingUnavailable(SignalingError):
    """Not connected to the signaling server right now (the client keeps reconnecting)."""


class SignalingTLSError(SignalingError):
    """TLS to a ``wss://`` server failed: an untrusted certificate or a failed handshake.

    The message names the problem and the fix (e.g. trust a self-signed certificate
    with ``SWARM_NOTEBOOK_CA_FILE``)."""


class SignalingURLError(UsageError, ValueError):
    """A signaling URL that cannot work (not ``ws://`` / ``wss://``, no host, bad port)."""


class EnvironmentMismatchWarning(SwarmError, UserWarning):
    """A peer runs other major.minor versions of numpy or pandas than this one (once per peer).

    A warning, not an error: the task ran; its results may differ from running here.
    """


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


class RefError(SwarmError, LookupError):
    """A resident-data ref cannot be used: unknown, released, another peer's, lost, or no
    holder had room (``store-full``). ``ref_id`` names it."""

    def __init__(self, reason: Reason | str, message: str, ref_id: str | None = None) -> None:
        super().__init__(reason, message)
        self.ref_id = ref_id


class HandlerRefusal(SwarmError):
    """Raised inside a message handler to answer the peer with a reason code."""


class DelegationError(SwarmError):
    """No peer could run the task: nobody capable, every attempt refused or lost, no time."""


class NoCapablePeerError(DelegationError):
    """No connected peer offers the capabilities the task needs."""


class TaskRefused(DelegationError):
    """A task refused before anything ran (bad input, oversize, policy, queue full).

    Executors and the owner's policy raise it on the serving side; the delegating side
    raises it when a refusal ends the task (one that every peer would give, or the one
    peer the task was pinned to). ``peer`` is the peer that refused, if known.
    """

    def __init__(self, reason: Reason | str, message: str, peer: str | None = None) -> None:
        super().__init__(reason, message)
        self.peer = peer


class AttemptsExhausted(DelegationError):
    """Every peer the task was sent to refused it, went away or did not answer.

    ``failures`` says, per attempt, which peer and why.
    """

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        super().__init__(Reason.ATTEMPTS_EXHAUSTED, message)
        self.failures = list(failures or [])


class DelegationTimeout(DelegationError, TimeoutError):
    """No capable peer had room for the task before its timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.TIMEOUT, message)


class RemoteTaskError(SwarmError):
    """A cell ran on a peer and failed; the traceback shown is the remote one.

    ``%%swarm run`` and ``TaskHandle`` raise it; ``delegate_task`` returns the failed
    result dict instead (the task did run).

    >>> err = RemoteTaskError("ABCDEFGH" * 6, "t1", "ZeroDivisionError: division by zero",
    ...                       "Traceback...\\nZeroDivisionError: division by zero\\n",
    ...                       peer_name="worker-1")
    >>> err._render_traceback_()[0]
    'Remote traceback (peer worker-1 (ABCDEFGHABCDEFGH…), task t1):'
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


class SessionLostError(SwarmError):
    """A session's namespace is gone: its peer or sandbox died, it expired idle, or it was
    closed. Sessions are never re-created by themselves; open a new one.

    >>> SessionLostError("train", "its peer went away").message
    "session 'train' is lost: its peer went away"
    """

    def __init__(self, session: str, why: str, peer: str | None = None) -> None:
        self.session = session
        self.why = why
        self.peer = peer
        super().__init__(Reason.SESSION_LOST, f"session {session!r} is lost: {why}")


class WaitTimeout(SwarmError, TimeoutError):
    """What we waited for (peers to connect, a task to finish) did not happen in time."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.TIMEOUT, message)


class SandboxUnavailable(SwarmError, RuntimeError):
    """The sandbox could not be started (or cannot isolate on this machine)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SANDBOX_UNAVAILABLE, message)


class CardError(SwarmError, ValueError):
    """An agent card that is not acceptable."""


class RosterError(SwarmError, ValueError):
    """A room roster that cannot be used (bad shape, bad signature, not the trusted owner's)."""


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


class StartupError(SwarmError, RuntimeError):
    """``swarm-notebook up`` could not start one of its parts (server, worker, JupyterLab)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.STARTUP_FAILED, message)


class BenchError(SwarmError, RuntimeError):
    """A benchmark could not be measured (a peer failed, a result was wrong)."""


class MetricError(BenchError, ValueError):
    """A metric with no samples, a non-finite sample, or recorded twice."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.BAD_METRIC, message)


class LeftoverProcessesError(BenchError):
    """A benchmark block left child processes behind."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.LEFTOVER_PROCESSES, message)


def short_id(peer: str | None, width: int = 16) -> str:
    """A peer id cut for display.

    >>> short_id("A" * 52)
    'AAAAAAAAAAAAAAAA…'
    """
    if not peer:
        return "?"
    return peer if len(peer) <= width else peer[:width] + "…"


__all__ = [
    "AttemptsExhausted",
    "AuditError",
    "BenchError",
    "CardError",
    "ConsensusError",
    "DelegationError",
    "DelegationTimeout",
    "EnvironmentMismatchWarning",
    "FrameInputError",
    "HandlerRefusal",
    "IdentityError",
    "LeftoverProcessesError",
    "MetricError",
    "ModificationRejected",
    "NoCapablePeerError",
    "NotJoinedError",
    "PeerUnavailable",
    "ProtocolError",
    "RefError",
    "ReflectionRejected",
    "RemoteError",
    "RemoteTaskError",
    "RequestTimeout",
    "SandboxUnavailable",
    "SessionLostError",
    "SignalingError",
    "SignalingRefused",
    "SignalingTimeout",
    "SignalingURLError",
    "SignalingUnavailable",
    "StartupError",
    "SwarmError",
    "TaskInputError",
    "TaskRefused",
    "TransportError",
    "UnknownSuiteError",
    "UnknownTaskTypeError",
    "UsageError",
    "ValueCodecError",
    "WaitTimeout",
]
