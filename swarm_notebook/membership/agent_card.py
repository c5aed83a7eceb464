"""Signed agent cards: who a peer is, what it can do, and its limits.

A card is signed by its author so it stays trustworthy when relayed or stored. Load changes
far more often than capabilities, so it travels separately (unsigned, over the already
authenticated link) and never forces a re-signature.
"""

from __future__ import annotations

import time

import msgspec

from swarm_notebook.errors import CardError
from swarm_notebook.identity import Identity, is_canonical_peer_id, verify_signature
from swarm_notebook.membership.versions import report_problem
from swarm_notebook.reasons import Reason

CARD_CONTEXT = b"swarm-notebook/agent-card/v1\x00"
MAX_CAPABILITIES = 32
MAX_CAPABILITY_LENGTH = 64
MAX_NAME_LENGTH = 64


def card_name(name: str) -> str:
    """A name as a card carries it: one line, at most ``MAX_NAME_LENGTH`` characters.

    >>> card_name("  alice/   quick\\tstart ")
    'alice/ quick start'
    """
    flat = " ".join(name.split())
    return flat[:MAX_NAME_LENGTH] or "peer"


class AgentCard(msgspec.Struct, frozen=True):
    peer_id: str
    name: str
    version: str
    capabilities: list[str]
    concurrency: int
    limits: dict[str, int]
    seq: int
    issued_at: float
    signature: bytes = b""
    # How this peer runs other peers' Python: "bubblewrap", "none" (the owner chose
    # --unsafe-no-isolation) or "" (it does not run Python for peers). Signed like the rest.
    isolation: str = ""
    # What it runs: {"python": "3.11.9", "pandas": "2.2.3", ...} (membership/versions.py).
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    # What runs it: "sandbox", "dask" (a Dask cluster, unisolated) or "" (nothing).
    backend: str = ""

    def signed_payload(self) -> bytes:
        unsigned = msgspec.structs.replace(self, signature=b"")
        return CARD_CONTEXT + msgspec.msgpack.encode(unsigned)


class LoadReport(msgspec.Struct, frozen=True):
    """Current work on a peer: ``in_flight`` running, ``queued`` waiting."""

    in_flight: int
    queued: int
    concurrency: int


def make_card(
    identity: Identity,
    *,
    name: str,
    version: str,
    capabilities: list[str],
    concurrency: int,
    limits: dict[str, int],
    seq: int,
    isolation: str = "",
    environment: dict[str, str] | None = None,
    backend: str = "",
) -> AgentCard:
    card = AgentCard(
        peer_id=identity.peer_id,
        name=card_name(name),
        version=version,
        capabilities=sorted(set(capabilities)),
        concurrency=concurrency,
        limits=dict(limits),
        seq=seq,
        issued_at=time.time(),
        isolation=isolation,
        environment=dict(environment or {}),
        backend=backend,
    )
    return msgspec.structs.replace(card, signature=identity.sign(card.signed_payload()))


def verify_card(card: AgentCard, sender: str) -> AgentCard:
    """Check a card received from ``sender``; raises ``CardError`` with a reason."""
    if not is_canonical_peer_id(card.peer_id):
        raise CardError(Reason.BAD_ID, f"card id {card.peer_id!r:.60} is not a canonical peer id")
    if card.peer_id != sender:
        raise CardError(
            Reason.CARD_NOT_SENDERS, f"card for {card.peer_id[:16]} sent by {sender[:16]}"
        )
    if len(card.capabilities) > MAX_CAPABILITIES or any(
        not c or len(c) > MAX_CAPABILITY_LENGTH for c in card.capabilities
    ):
        raise CardError(Reason.BAD_CARD, "too many or malformed capabilities")
    if not 1 <= card.concurrency <= 1024:
        raise CardError(Reason.BAD_CARD, f"concurrency {card.concurrency}")
    if len(card.name) > MAX_NAME_LENGTH or len(card.version) > MAX_CAPABILITY_LENGTH:
        raise CardError(Reason.BAD_CARD, "name or version too long")
    if len(card.isolation) > MAX_CAPABILITY_LENGTH or len(card.backend) > MAX_CAPABILITY_LENGTH:
        raise CardError(Reason.BAD_CARD, "malformed isolation or backend")
    problem = report_problem(card.environment)
    if problem is not None:
        raise CardError(Reason.BAD_CARD, f"environment: {problem}")
    if not verify_signature(card.peer_id, card.signature, card.signed_payload()):
        raise CardError(Reason.BAD_SIGNATURE, "agent card signature does not verify")
    return card
