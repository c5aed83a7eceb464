"""Every reason code: on the wire, in rejection counters and on errors (``SwarmError.reason``).

A reason is a short, stable, lower-case word that a program can branch on and a person can
read. ``Reason`` is a ``StrEnum``, so ``Reason.TOO_LARGE == "too-large"``: codes that arrive
from other peers as plain strings compare equal to the members here.

>>> from swarm_notebook.reasons import Reason
>>> Reason("too-large") is Reason.TOO_LARGE
True
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # -- frames and messages (protocol, signaling, transport) --------------------------
    MALFORMED = "malformed"  # not decodable at all (garbage, truncated, bad UTF-8)
    WRONG_SCHEMA = "wrong-schema"  # decodable, but not a message we accept
    TOO_LARGE = "too-large"
    OVERSIZED = "oversized"  # a frame or message over its size limit
    TOO_DEEP = "too-deep"
    BAD_VERSION = "bad-version"
    UNKNOWN_TYPE = "unknown-type"
    UNSUPPORTED_TYPE = "unsupported-type"
    PICKLE_REFUSED = "pickle-refused"
    RATE_LIMITED = "rate-limited"
    EMPTY_FRAME = "empty-frame"
    TEXT_FRAME = "text-frame"
    BAD_FRAME_KIND = "bad-frame-kind"
    BAD_CHUNK_COUNT = "bad-chunk-count"
    TRUNCATED_CHUNK = "truncated-chunk"
    CHUNK_OUT_OF_ORDER = "chunk-out-of-order"
    TOO_MANY_TRANSFERS = "too-many-transfers"
    REASSEMBLY_FULL = "reassembly-full"
    REASSEMBLY_TIMEOUT = "reassembly-timeout"
    UNMATCHED_REPLY = "unmatched-reply"
    BAD_REPLY = "bad-reply"
    UNKNOWN_LINK_MESSAGE = "unknown-link-message"
    UNAUTHENTICATED = "unauthenticated"  # an application or chunked message before link proof
    REFUSED = "refused"  # a peer refused our message with a reason we do not know
    HANDLER_ERROR = "handler-error"
    # -- signaling ---------------------------------------------------------------------
    NOT_JOINED = "not-joined"
    ALREADY_JOINED = "already-joined"
    UNKNOWN_PEER = "unknown-peer"
    PEER_BUSY = "peer-busy"
    BAD_SIGNATURE = "bad-signature"
    BAD_SECRET = "bad-secret"
    BAD_ROOM = "bad-room"
    BAD_SIGNAL = "bad-signal"
    ROOM_FULL = "room-full"
    TOO_MANY_ROOMS = "too-many-rooms"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    # per remote address (signaling/quotas.py)
    TOO_MANY_CONNECTIONS_FROM_ADDRESS = "too-many-connections-from-address"
    TOO_MANY_PENDING = "too-many-pending"  # sockets from one address that have not joined
    TOO_MANY_ROOMS_FROM_ADDRESS = "too-many-rooms-from-address"
    TOO_MANY_PEERS_FROM_ADDRESS = "too-many-peers-from-address"
    LOCKED_OUT = "locked-out"  # too many wrong room secrets from one address
    UNTRUSTED_CERTIFICATE = "untrusted-certificate"  # wss:// server certificate not verified
    TLS_FAILED = "tls-failed"  # the TLS handshake failed for another reason
    JOIN_TIMEOUT = "join-timeout"
    REPLACED = "replaced"
    SLOW_CONSUMER = "slow-consumer"
    ABUSE = "abuse"
    SIGNALING_UNREACHABLE = "signaling-unreachable"
    BAD_SIGNALING_URL = "bad-signaling-url"  # not ws(s)://host:port/path, or no server there
    VERSION_MISMATCH = "version-mismatch"  # a peer's numpy / pandas major.minor differ
    UNMET_REQUIREMENT = "unmet-requirement"  # no peer has the package versions required
    SHUTDOWN = "shutdown"  # the client is shutting down
    # -- links -------------------------------------------------------------------------
    AUTH_FAILED = "auth-failed"
    BAD_HELLO = "bad-hello"
    HELLO_MISMATCH = "hello-mismatch"
    UNEXPECTED_OFFER = "unexpected-offer"
    STALE_ANSWER = "stale-answer"
    STALE_CANDIDATE = "stale-candidate"
    TOO_MANY_CANDIDATES = "too-many-candidates"
    PEER_UNAVAILABLE = "peer-unavailable"
    PEER_GONE = "peer-gone"
    PEER_LEFT = "peer-left"
    AMBIGUOUS_PEER = "ambiguous-peer"
    # -- ICE (STUN / TURN) -------------------------------------------------------------
    BAD_ICE_CONFIG = "bad-ice-config"
    TURN_REFUSED = "turn-refused"  # the TURN server rejected our credentials
    ICE_UNREACHABLE = "ice-unreachable"  # a STUN / TURN server did not answer
    # -- transport backends ------------------------------------------------------------
    BAD_TRANSPORT_BACKEND = "bad-transport-backend"  # not a backend name
    BACKEND_UNAVAILABLE = "backend-unavailable"  # its library is not installed here
    # the direct (TLS over TCP) path of the ``direct`` backend, and why a link fell back
    DIRECT_NOT_OFFERED = "direct-not-offered"  # the offer has no x-swarm-direct line
    DIRECT_DECLINED = "direct-declined"  # the answer has no x-swarm-direct-ok line
    DIRECT_UNREACHABLE = "direct-unreachable"  # connect refused or no route
    DIRECT_TIMEOUT = "direct-timeout"  # no TLS stream (or token, or ack) in time
    DIRECT_REFUSED = "direct-refused"  # the listener closed instead of acknowledging
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"  # TLS certificate not the offer's
    BAD_TOKEN = "bad-token"  # a connection to the listener sent the wrong token
    FRAME_TOO_LARGE = "frame-too-large"  # a stream frame over its cap
    # -- identity and membership -------------------------------------------------------
    BAD_ID = "bad-id"
    BAD_KEY = "bad-key"
    BAD_PEER = "bad-peer"
    BAD_CARD = "bad-card"
    CARD_NOT_SENDERS = "card-not-senders"
    UNTRUSTED_OWNER = "untrusted-owner"  # a roster not signed by the owner we trust
    STALE_ROSTER = "stale-roster"  # a roster no newer than the one we hold
    # -- workload ----------------------------------------------------------------------
    NOT_INITIALIZED = "not-initialized"
    NOT_JOINED_SWARM = "left-the-swarm"  # this coordinator left; join() again
    BAD_ARGUMENTS = "bad-arguments"
    BAD_INPUT = "bad-input"
    UNKNOWN_TASK_TYPE = "unknown-task-type"
    UNKNOWN_VARIABLE = "unknown-variable"
    NO_CAPABLE_PEER = "no-capable-peer"
    CAPABILITY_MISSING = "capability-missing"
    ATTEMPTS_EXHAUSTED = "attempts-exhausted"
    NOT_ALLOWED = "not-allowed"
    # A peer that runs code without isolation (a Dask cluster) serves only its allowlist.
    NOT_ON_ALLOWLIST = "not-on-allowlist"
    BUSY = "busy"
    WORKER_SHUTDOWN = "worker-shutdown"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    MEMORY_LIMIT = "memory-limit"
    PROCESS_LIMIT = "process-limit"
    REMOTE_EXCEPTION = "remote-exception"
    SYNTAX_ERROR = "syntax-error"
    MISSING_PACKAGE = "missing-package"
    MISSING_OUTPUT = "missing-output"
    RESULT_TOO_LARGE = "result-too-large"
    WORKER_CRASHED = "worker-crashed"
    # A sandbox child's result in shared memory the pool refuses to map (``sandbox/shm``).
    SHM_UNSEALED = "shared-memory-unsealed"  # not a memfd, or one that could still change
    SHM_OVERSIZED = "shared-memory-oversized"  # larger than the result budget left
    SHM_BAD_REFERENCE = "shared-memory-bad-reference"  # names an fd not sent, or twice
    SESSION_LOST = "session-lost"  # its peer or sandbox died, it expired or was closed
    NOT_SESSION_OWNER = "not-session-owner"  # another peer opened the session
    TOO_MANY_SESSIONS = "too-many-sessions"
    SANDBOX_UNAVAILABLE = "sandbox-unavailable"
    INTERNAL_ERROR = "internal-error"
    PATH_OUTSIDE_WORKSPACE = "path-outside-workspace"
    NOT_FOUND = "not-found"
    WRITE_REFUSED = "write-refused"
    GIT_ERROR = "git-error"
    LLM_UNAVAILABLE = "llm-unavailable"
    LLM_BAD_RESPONSE = "llm-bad-response"
    POLICY_ERROR = "policy-error"
    STORE_FULL = "store-full"
    # -- resident data (refs) ------------------------------------------------------------
    REF_NOT_FOUND = "ref-not-found"  # no such ref here: never put, released, or its holder left
    REF_FORBIDDEN = "ref-forbidden"  # the ref belongs to another peer
    REF_LOST = "ref-lost"  # its only holder left and no owner copy exists to re-push
    CLOSED = "closed"  # the service was closed (the coordinator left)
    # -- knowledge ---------------------------------------------------------------------
    AUTHOR_MISMATCH = "author-mismatch"
    RESERVED_TAG = "reserved-tag"
    NOT_SUCCESSFUL = "not-successful"
    REPLAYED = "replayed"
    STALE = "stale"
    CONTENT_MISMATCH = "content-mismatch"
    # -- governance --------------------------------------------------------------------
    SWARM_NOT_AVAILABLE = "swarm-not-available"
    BAD_QUORUM = "bad-quorum"
    BAD_OPERATION = "bad-operation"
    BAD_OUTCOME = "bad-outcome"
    NON_MEMBER = "non-member"
    NO_ROSTER = "no-roster"  # a high-risk proposal in a room without a roster
    ROSTER_MISMATCH = "roster-mismatch"  # the proposal's electorate is not our roster
    TAMPERED = "tampered"  # a consensus result whose parts do not add up
    NO_MEMBERS = "no-members"
    NO_QUORUM = "no-quorum"
    QUORUM_UNREACHABLE = "quorum-unreachable"
    QUORUM_MISMATCH = "quorum-mismatch"
    PROPOSER_MISMATCH = "proposer-mismatch"
    WRONG_PROPOSAL = "wrong-proposal"
    UNKNOWN_PROPOSAL = "unknown-proposal"
    DUPLICATE_PROPOSAL = "duplicate-proposal"
    TOO_MANY_PROPOSALS = "too-many-proposals"
    TOO_MANY_MEMBERS = "too-many-members"
    TOO_MANY_ITEMS = "too-many-items"
    REJECTED = "rejected"
    LATE = "late"  # a ballot after the proposal's deadline
    # -- views and the command line ----------------------------------------------------
    BAD_TYPE = "bad-type"
    BAD_RECORD = "bad-record"
    BAD_NUMBER = "bad-number"
    MISSING_FIELD = "missing-field"
    DUPLICATE_ID = "duplicate-id"
    UNKNOWN_CATEGORY = "unknown-category"
    NO_KERNEL = "no-kernel"
    NOT_LOADED = "not-loaded"
    BAD_SOURCE = "bad-source"
    NO_EVENT_LOOP = "no-event-loop"
    MISSING_ASSET = "missing-asset"
    SNAPSHOT_FAILED = "snapshot-failed"
    BAD_SNAPSHOT = "bad-snapshot"
    INITIALIZE_TIMEOUT = "initialize-timeout"
    INITIALIZE_FAILED = "initialize-failed"
    UNKNOWN_ACTION = "unknown-action"
    STARTUP_FAILED = "startup-failed"
    UNKNOWN_EVENT = "unknown-event"
    # -- benchmarks --------------------------------------------------------------------
    UNKNOWN_SUITE = "unknown-suite"
    BAD_METRIC = "bad-metric"
    LEFTOVER_PROCESSES = "leftover-processes"
    BENCH_FAILED = "bench-failed"


def is_reason(code: object) -> bool:
    """True if ``code`` is one of the documented reason codes.

    >>> is_reason("busy"), is_reason("whatever")
    (True, False)
    """
    return isinstance(code, str) and code in Reason._value2member_map_
