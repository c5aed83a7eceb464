"""Signed proposals, signed ballots, and a tally anyone can re-check.

Every vote is counted and every claimed id is checked:

* a ``Proposal`` is signed by its proposer and fixes the electorate (``members``), the
  quorum rule and a deadline. In a room with a roster, ``members`` is the roster (less
  the proposer) and ``roster`` binds the owner-signed roster's hash; in an *open* room
  (no roster) it is the authenticated peers connected when it was made;
* a ``Ballot`` is signed by its voter and bound to the proposal's hash;
* a ``Tally`` counts only ballots that verify, come from members, arrive before the
  deadline and are each voter's first; everything else is ignored *and reported*;
* ``verify_consensus`` lets any peer re-check a published result end to end, including
  the embedded roster (``electorate: "roster"``) or that the room was open
  (``electorate: "open"``; a high-risk approval never verifies in an open room).

Timeouts fail closed (``consensus: False, reason: "timeout"``). The one fail-open rule:
when there is no swarm to ask, ``unavailable_result()`` says
``consensus: True, reason: "swarm-not-available"``, so a lone notebook is not blocked;
it can be switched to fail closed.
All functions are pure; time is always passed in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

import msgspec

from swarm_notebook.errors import ConsensusError
from swarm_notebook.governance.risk import (
    DEFAULT_CORE_FILES,
    Modification,
    assess_modification_risk,
    modification_hash,
    parse_modification,
)
from swarm_notebook.identity import Identity, is_canonical_peer_id, verify_signature
from swarm_notebook.membership.roster import Roster, roster_hash, roster_problem, verified_roster
from swarm_notebook.reasons import Reason

PROPOSAL_CONTEXT = b"swarm-notebook/proposal/v1\x00"
BALLOT_CONTEXT = b"swarm-notebook/ballot/v1\x00"
DEFAULT_TIMEOUT_S = 30.0
MAX_MEMBERS = 256
MAX_RATIONALE_LENGTH = 2000
MAX_BALLOT_REASON_LENGTH = 500
MAX_ID_LENGTH = 64
MAX_TIMEOUT_S = 24 * 3600.0
UNAVAILABLE = "swarm-not-available"
OPEN = "open"
ROSTER = "roster"

Decision = Literal["approved", "rejected"] | None
_PEER_ID = re.compile(r"[a-z2-7]{52}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")
_HASH_HEX = re.compile(r"[0-9a-f]{64}")
_PROPOSAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ---------------------------------------------------------------------------- quorum


class Quorum(Protocol):
    """A rule deciding an outcome from counts; ``spec`` is its signed text form."""

    @property
    def spec(self) -> str: ...

    def decide(self, members: int, approvals: int, rejections: int) -> Decision:
        """``"approved"`` / ``"rejected"`` once the outcome can no longer change, else None."""
        ...

    def needed(self, members: int) -> int:
        """Approvals needed to pass with ``members`` voters."""
        ...


def _decide_by_needed(needed: int, members: int, approvals: int, rejections: int) -> Decision:
    if approvals >= needed:
        return "approved"
    if members - rejections < needed:
        return "rejected"
    return None


@dataclass(frozen=True)
class StrictMajority:
    """More than half of the members approve."""

    @property
    def spec(self) -> str:
        return "strict-majority"

    def needed(self, members: int) -> int:
        return members // 2 + 1

    def decide(self, members: int, approvals: int, rejections: int) -> Decision:
        return _decide_by_needed(self.needed(members), members, approvals, rejections)


@dataclass(frozen=True)
class Unanimous:
    """Every member approves; one rejection decides."""

    @property
    def spec(self) -> str:
        return "unanimous"

    def needed(self, members: int) -> int:
        return members

    def decide(self, members: int, approvals: int, rejections: int) -> Decision:
        return _decide_by_needed(self.needed(members), members, approvals, rejections)


@dataclass(frozen=True)
class Threshold:
    """At least ``k`` members approve."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConsensusError(Reason.BAD_QUORUM, "threshold must be at least 1")

    @property
    def spec(self) -> str:
        return f"threshold:{self.k}"

    def needed(self, members: int) -> int:
        return self.k

    def decide(self, members: int, approvals: int, rejections: int) -> Decision:
        return _decide_by_needed(self.k, members, approvals, rejections)


def parse_quorum(spec: str) -> Quorum:
    """``"strict-majority"``, ``"unanimous"`` or ``"threshold:<k>"`` back to a rule."""
    if spec == "strict-majority":
        return StrictMajority()
    if spec == "unanimous":
        return Unanimous()
    name, _, arg = spec.partition(":")
    if name == "threshold" and arg.isdigit() and len(arg) <= 4:
        return Threshold(int(arg))
    raise ConsensusError(Reason.BAD_QUORUM, f"unknown quorum rule {spec!r:.40}")


def describe_quorum(rule: Quorum, members: int) -> dict[str, Any]:
    return {"rule": rule.spec, "members": members, "needed": rule.needed(members)}


# -------------------------------------------------------------------------- proposal


class Proposal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed request to vote on a modification.

    ``content_hash`` is ``modification_hash(modification)``: the code travels beside the
    proposal and voters check it against this hash. ``members`` is sorted.
    """

    id: str
    content_hash: str
    target: str
    rationale: str
    risk: str
    operation: str
    proposer: str
    members: tuple[str, ...]
    quorum: str
    created_at: float
    deadline: float
    signature: str = ""
    roster: str = ""  # hash of the owner-signed roster the members come from; "" = open


class Ballot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One member's signed vote, bound to ``proposal_hash``."""

    proposal_id: str
    proposal_hash: str
    voter: str
    approve: bool
    reason: str
    cast_at: float
    signature: str = ""


_encoder = msgspec.msgpack.Encoder()


def _proposal_payload(p: Proposal) -> bytes:
    fields: list[Any] = [
        p.id,
        p.content_hash,
        p.target,
        p.rationale,
        p.risk,
        p.operation,
        p.proposer,
        list(p.members),
        p.quorum,
        float(p.created_at),
        float(p.deadline),
    ]
    if p.roster:
        # Only when bound: open-room proposals sign exactly what they always signed, so
        # results published before rosters existed still verify.
        fields.append(p.roster)
    return PROPOSAL_CONTEXT + _encoder.encode(fields)


def _ballot_payload(b: Ballot) -> bytes:
    return BALLOT_CONTEXT + _encoder.encode(
        [b.proposal_id, b.proposal_hash, b.voter, bool(b.approve), b.reason, float(b.cast_at)]
    )


def proposal_hash(proposal: Proposal) -> str:
    """Hex sha256 over the proposal's signed payload (everything but the signature)."""
    return hashlib.sha256(_proposal_payload(proposal)).hexdigest()


def _check_members(members: Iterable[str]) -> tuple[str, ...]:
    unique = sorted(set(members))
    if not unique:
        raise ConsensusError(Reason.NO_MEMBERS, "nobody to ask: use unavailable_result()")
    if len(unique) > MAX_MEMBERS:
        raise ConsensusError(Reason.TOO_MANY_MEMBERS, f"{len(unique)} members > {MAX_MEMBERS}")
    for member in unique:
        if not isinstance(member, str) or not _PEER_ID.fullmatch(member):
            raise ConsensusError(Reason.WRONG_SCHEMA, f"member {member!r:.60} is not a peer id")
        if not is_canonical_peer_id(member):
            raise ConsensusError(Reason.BAD_ID, f"member {member!r:.60} is not a canonical id")
    return tuple(unique)


def roster_electorate(roster: Roster, proposer: str) -> tuple[str, ...]:
    """Who votes on ``proposer``'s proposals in a roster room: the roster less the proposer."""
    return tuple(m for m in roster.ids if m != proposer)


def split_members(peers: Iterable[str]) -> tuple[list[str], list[str]]:
    """(canonical ids, everything else): a bad id is reported, never raised out of consensus."""
    good: list[str] = []
    bad: list[str] = []
    for peer in peers:
        (good if is_canonical_peer_id(peer) else bad).append(peer)
    return good, bad


def make_proposal(
    identity: Identity,
    modification: Modification | dict[str, Any],
    members: Iterable[str],
    now: float,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    quorum: Quorum | None = None,
    proposal_id: str | None = None,
    core_files: Iterable[str] = DEFAULT_CORE_FILES,
    roster: Roster | None = None,
) -> Proposal:
    """Sign a proposal for ``modification`` put to ``members`` (the connected,
    authenticated peers now; may include the proposer), deciding by ``quorum``
    (strict majority by default) before ``now + timeout_s``.

    With ``roster`` (verified against its own owner here; trust in that owner is the
    caller's), ``members`` must be ``roster_electorate(roster, proposer)``.

    >>> from swarm_notebook.identity import Identity
    >>> me = Identity.generate()
    >>> p = make_proposal(me, {"file_path": "notes.md", "code": "# x"}, [me.peer_id], now=0.0)
    >>> verify_proposal(p), p.risk, p.deadline
    (True, 'low', 30.0)
    """
    mod = parse_modification(modification)
    rule = quorum or StrictMajority()
    member_ids = _check_members(members)
    if roster is not None:
        problem = roster_problem(roster)
        if problem is not None:
            raise ConsensusError(problem, "the roster does not verify")
        if member_ids != roster_electorate(roster, identity.peer_id):
            raise ConsensusError(Reason.ROSTER_MISMATCH, "members are not the roster's")
    if rule.needed(len(member_ids)) > len(member_ids):
        raise ConsensusError(
            Reason.BAD_QUORUM, f"{rule.spec} can never pass with {len(member_ids)} members"
        )
    if not (0 < timeout_s <= MAX_TIMEOUT_S) or not math.isfinite(now):
        raise ConsensusError(Reason.WRONG_SCHEMA, f"timeout must be in (0, {MAX_TIMEOUT_S}] s")
    if len(mod.reason) > MAX_RATIONALE_LENGTH:
        raise ConsensusError(Reason.OVERSIZED, f"rationale longer than {MAX_RATIONALE_LENGTH}")
    unsigned = Proposal(
        id=proposal_id or secrets.token_hex(16),
        content_hash=modification_hash(mod),
        target=mod.file_path,
        rationale=mod.reason,
        risk=assess_modification_risk(mod, core_files),
        operation=mod.operation,
        proposer=identity.peer_id,
        members=member_ids,
        quorum=rule.spec,
        created_at=float(now),
        deadline=float(now + timeout_s),
        roster=roster_hash(roster) if roster is not None else "",
    )
    if not _PROPOSAL_ID.fullmatch(unsigned.id):
        raise ConsensusError(Reason.WRONG_SCHEMA, "proposal id must be 1..64 of [A-Za-z0-9_-]")
    return msgspec.structs.replace(
        unsigned, signature=identity.sign(_proposal_payload(unsigned)).hex()
    )


def parse_proposal(obj: Any) -> Proposal:
    """A proposal from a dict / msgpack bytes / struct; raises ``ConsensusError``."""
    try:
        if isinstance(obj, Proposal):
            return obj
        if isinstance(obj, bytes | bytearray | memoryview):
            return msgspec.msgpack.decode(obj, type=Proposal)
        return msgspec.convert(obj, Proposal)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConsensusError(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc


def proposal_problem(p: Proposal) -> str | None:
    """Why a proposal is unusable (short code), or None when it is well-formed and signed."""
    if not _PROPOSAL_ID.fullmatch(p.id) or not _HASH_HEX.fullmatch(p.content_hash):
        return "wrong-schema"
    if len(p.rationale) > MAX_RATIONALE_LENGTH or len(p.target) > 1024:
        return "oversized"
    if not p.members or len(p.members) > MAX_MEMBERS:
        return "wrong-schema"
    if list(p.members) != sorted(set(p.members)):
        return "wrong-schema"
    if not all(_PEER_ID.fullmatch(m) for m in p.members):
        return "wrong-schema"
    if not all(is_canonical_peer_id(m) for m in p.members):
        return Reason.BAD_ID.value
    if p.roster and not _HASH_HEX.fullmatch(p.roster):
        return "wrong-schema"
    if not (math.isfinite(p.created_at) and math.isfinite(p.deadline)):
        return "wrong-schema"
    if not (0 < p.deadline - p.created_at <= MAX_TIMEOUT_S):
        return "wrong-schema"
    try:
        parse_quorum(p.quorum)
    except ConsensusError:
        return "bad-quorum"
    if not _PEER_ID.fullmatch(p.proposer) or not _SIGNATURE_HEX.fullmatch(p.signature):
        return "bad-signature"
    if not is_canonical_peer_id(p.proposer):
        return Reason.BAD_ID.value
    if not verify_signature(p.proposer, bytes.fromhex(p.signature), _proposal_payload(p)):
        return "bad-signature"
    return None


def verify_proposal(proposal: Proposal) -> bool:
    """True when the proposal is well-formed and signed by its proposer."""
    return proposal_problem(proposal) is None


def modification_matches(proposal: Proposal, modification: Modification | dict[str, Any]) -> bool:
    """True when ``modification`` is the one the proposal was made for."""
    try:
        mod = parse_modification(modification)
    except ValueError:
        return False
    return (
        modification_hash(mod) == proposal.content_hash
        and mod.file_path == proposal.target
        and mod.operation == proposal.operation
    )


# ---------------------------------------------------------------------------- ballot


def cast_ballot(
    identity: Identity, proposal: Proposal, approve: bool, reason: str, now: float
) -> Ballot:
    """Sign ``identity``'s vote on ``proposal`` (reason is cut to 500 characters)."""
    unsigned = Ballot(
        proposal_id=proposal.id,
        proposal_hash=proposal_hash(proposal),
        voter=identity.peer_id,
        approve=bool(approve),
        reason=reason[:MAX_BALLOT_REASON_LENGTH],
        cast_at=float(now),
    )
    return msgspec.structs.replace(
        unsigned, signature=identity.sign(_ballot_payload(unsigned)).hex()
    )


def parse_ballot(obj: Any) -> Ballot:
    """A ballot from a dict / msgpack bytes / struct; raises ``ConsensusError``."""
    try:
        if isinstance(obj, Ballot):
            ballot = obj
        elif isinstance(obj, bytes | bytearray | memoryview):
            ballot = msgspec.msgpack.decode(obj, type=Ballot)
        else:
            ballot = msgspec.convert(obj, Ballot)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConsensusError(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc
    if len(ballot.reason) > MAX_BALLOT_REASON_LENGTH:
        raise ConsensusError(Reason.OVERSIZED, f"reason longer than {MAX_BALLOT_REASON_LENGTH}")
    if len(ballot.proposal_id) > MAX_ID_LENGTH or not math.isfinite(ballot.cast_at):
        raise ConsensusError(Reason.WRONG_SCHEMA, "bad proposal id or cast_at")
    return ballot


def _signature_ok(ballot: Ballot) -> bool:
    if not _PEER_ID.fullmatch(ballot.voter) or not _SIGNATURE_HEX.fullmatch(ballot.signature):
        return False
    return verify_signature(ballot.voter, bytes.fromhex(ballot.signature), _ballot_payload(ballot))


def ballot_problem(ballot: Ballot, proposal: Proposal, p_hash: str | None = None) -> str | None:
    """Why a ballot does not count for ``proposal`` (ignoring time and duplicates)."""
    expected = p_hash or proposal_hash(proposal)
    if ballot.proposal_id != proposal.id or ballot.proposal_hash != expected:
        return "wrong-proposal"
    if not is_canonical_peer_id(ballot.voter):
        return Reason.BAD_ID.value
    if ballot.voter not in proposal.members:
        return "non-member"
    if not _signature_ok(ballot):
        return "forged"
    if ballot.cast_at > proposal.deadline:
        return "late"
    return None


def verify_ballot(ballot: Ballot, proposal: Proposal) -> bool:
    """True when the ballot is signed by a member and bound to this proposal."""
    return ballot_problem(ballot, proposal) is None


# ----------------------------------------------------------------------------- tally


class Tally:
    """Counts ballots for one proposal; decides as soon as the outcome is fixed.

    Ignored ballots are kept (voter, reason) up to ``max_ignored`` and always counted in
    ``ignored_counts``. Reasons: ``wrong-schema``, ``oversized``, ``wrong-proposal``,
    ``bad-id`` (not a key's canonical spelling), ``non-member`` (not on the proposal's
    electorate, e.g. off the roster), ``forged`` (signature does not verify), ``late``,
    ``duplicate``. ``roster`` must be given for a proposal that binds one.

    >>> from swarm_notebook.identity import Identity
    >>> a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    >>> p = make_proposal(a, {"file_path": "x.py", "code": "y = 1"},
    ...                   [a.peer_id, b.peer_id, c.peer_id], now=0.0)
    >>> t = Tally(p)
    >>> t.add(cast_ballot(a, p, True, "fine", now=1.0), now=1.0)
    True
    >>> t.decided
    False
    >>> t.add(cast_ballot(b, p, True, "ok", now=2.0), now=2.0)
    True
    >>> t.result()["consensus"], t.result()["reason"]
    (True, 'approved')
    """

    def __init__(
        self,
        proposal: Proposal,
        quorum: Quorum | None = None,
        *,
        max_ignored: int = 256,
        roster: Roster | None = None,
    ) -> None:
        problem = proposal_problem(proposal)
        if problem is not None:
            raise ConsensusError(problem, "the proposal does not verify")
        if proposal.roster:
            if roster is None or roster_hash(roster) != proposal.roster:
                raise ConsensusError(Reason.ROSTER_MISMATCH, "the proposal binds another roster")
            if roster_problem(roster) is not None:
                raise ConsensusError(Reason.ROSTER_MISMATCH, "the roster does not verify")
        self.roster = roster if proposal.roster else None
        self.proposal = proposal
        self.proposal_hash = proposal_hash(proposal)
        self.rule = parse_quorum(proposal.quorum)
        if quorum is not None and quorum.spec != self.rule.spec:
            raise ConsensusError(
                Reason.QUORUM_MISMATCH,
                f"proposal was signed for {self.rule.spec}, not {quorum.spec}",
            )
        self._ballots: dict[str, Ballot] = {}
        self._ignored: list[dict[str, str]] = []
        self._max_ignored = max_ignored
        self.ignored_counts: Counter[str] = Counter()

    def _ignore(self, voter: str, reason: str) -> bool:
        self.ignored_counts[reason] += 1
        if len(self._ignored) < self._max_ignored:
            self._ignored.append({"voter": voter[:MAX_ID_LENGTH], "reason": reason})
        return False

    def add(self, ballot: Ballot | Mapping[str, Any] | bytes, now: float) -> bool:
        """Count a ballot received at ``now``; False (and recorded) when it is ignored."""
        try:
            parsed = parse_ballot(ballot)
        except ConsensusError as exc:
            voter = ballot.get("voter") if isinstance(ballot, Mapping) else None
            return self._ignore(voter if isinstance(voter, str) else "?", exc.reason)
        problem = ballot_problem(parsed, self.proposal, self.proposal_hash)
        if problem is None and now > self.proposal.deadline:
            problem = "late"
        if problem is None and parsed.voter in self._ballots:
            problem = "duplicate"
        if problem is not None:
            return self._ignore(parsed.voter, problem)
        self._ballots[parsed.voter] = parsed
        return True

    @property
    def approvals(self) -> int:
        return sum(1 for b in self._ballots.values() if b.approve)

    @property
    def rejections(self) -> int:
        return sum(1 for b in self._ballots.values() if not b.approve)

    @property
    def decision(self) -> Decision:
        return self.rule.decide(len(self.proposal.members), self.approvals, self.rejections)

    @property
    def decided(self) -> bool:
        return self.decision is not None

    def expired(self, now: float) -> bool:
        return now > self.proposal.deadline

    def result(self, *, now: float | None = None, reason: str | None = None) -> dict[str, Any]:
        """The outcome as a plain dict (see ``verify_consensus``).

        Decided: ``reason`` is ``"approved"`` / ``"rejected"``. Undecided: consensus is
        False with ``reason`` if given, else ``"timeout"`` when ``now`` is past the
        deadline, else ``"pending"``.
        """
        decision = self.decision
        if decision is not None:
            final_reason: str = decision
        elif reason is not None:
            final_reason = reason
        elif now is not None and self.expired(now):
            final_reason = "timeout"
        else:
            final_reason = "pending"
        members = len(self.proposal.members)
        return {
            "consensus": decision == "approved",
            "reason": final_reason,
            "decided": decision is not None,
            "votes": {
                voter: {"approve": b.approve, "reason": b.reason}
                for voter, b in self._ballots.items()
            },
            "ballots": [msgspec.to_builtins(b) for b in self._ballots.values()],
            "ignored": [dict(item) for item in self._ignored],
            "ignored_counts": dict(self.ignored_counts),
            "proposal": msgspec.to_builtins(self.proposal),
            "proposal_hash": self.proposal_hash,
            "approve_count": self.approvals,
            "reject_count": self.rejections,
            "missing": [m for m in self.proposal.members if m not in self._ballots],
            "quorum": describe_quorum(self.rule, members),
            "electorate": ROSTER if self.roster is not None else OPEN,
            "roster": msgspec.to_builtins(self.roster) if self.roster is not None else None,
        }


def unavailable_result(fail_closed: bool = False) -> dict[str, Any]:
    """The result when there is no swarm to ask (not started, or no peer connected).

    ``consensus: True`` with reason ``"swarm-not-available"``, so a lone
    notebook is not blocked; ``fail_closed=True`` returns ``consensus: False`` with the
    same reason. Such a result carries no ballots and never passes ``verify_consensus``.
    """
    return {
        "consensus": not fail_closed,
        "reason": UNAVAILABLE,
        "decided": False,
        "fail_closed": fail_closed,
        "votes": {},
        "ballots": [],
        "ignored": [],
        "ignored_counts": {},
        "proposal": None,
        "proposal_hash": None,
        "approve_count": 0,
        "reject_count": 0,
        "missing": [],
        "quorum": None,
        "electorate": None,
        "roster": None,
    }


@overload
def verify_consensus(
    result: Mapping[str, Any],
    *,
    detail: Literal[False] = False,
    trusted_owner: str | None = None,
) -> bool: ...


@overload
def verify_consensus(
    result: Mapping[str, Any], *, detail: Literal[True], trusted_owner: str | None = None
) -> dict[str, Any]: ...


def verify_consensus(
    result: Mapping[str, Any], *, detail: bool = False, trusted_owner: str | None = None
) -> bool | dict[str, Any]:
    """Re-check a published result: proposal signature, each ballot's signature, binding
    to the proposal hash, membership, deadline, no duplicate voters, the counts, the
    votes summary, the quorum, and that the rule yields the stated ``consensus`` and
    ``reason``. Any tampering (or any malformed part) gives False.

    The electorate is checked too: a roster result must carry the owner-signed roster
    whose hash the proposal binds, with ``members`` = roster less proposer (pass
    ``trusted_owner`` to also require that owner; an open result then fails). An open
    result verifies (the blueprint's rooms) but a high-risk approval in one never does.
    ``detail=True`` returns ``{"valid", "electorate": "open"|"roster", "owner", "problem"}``.
    """
    try:
        problem, electorate, owner = _verify_consensus(result, trusted_owner)
    except (ConsensusError, ValueError, TypeError, KeyError, AttributeError) as exc:
        problem, electorate, owner = getattr(exc, "reason", "malformed"), None, None
    if not detail:
        return problem is None
    return {
        "valid": problem is None,
        "electorate": electorate,
        "owner": owner,
        "problem": None if problem is None else str(problem),
    }


def _verify_consensus(
    result: Mapping[str, Any], trusted_owner: str | None
) -> tuple[str | None, str | None, str | None]:
    proposal = parse_proposal(result["proposal"])
    problem = proposal_problem(proposal)
    if problem is not None:
        return problem, None, None
    owner: str | None = None
    if proposal.roster:
        electorate = ROSTER
        roster = verified_roster(result["roster"], trusted_owner)
        owner = roster.owner
        if roster_hash(roster) != proposal.roster or result.get("electorate") != ROSTER:
            return Reason.ROSTER_MISMATCH, electorate, owner
        if proposal.members != roster_electorate(roster, proposal.proposer):
            return Reason.ROSTER_MISMATCH, electorate, owner
    else:
        electorate = OPEN
        if result.get("electorate", OPEN) != OPEN or result.get("roster") is not None:
            return Reason.ROSTER_MISMATCH, electorate, None
        if trusted_owner is not None:
            return Reason.NO_ROSTER, electorate, None
    ok = _verify_tally(result, proposal)
    if ok and electorate == OPEN and proposal.risk == "high" and result["consensus"] is True:
        return Reason.NO_ROSTER, electorate, None  # throwaway keys never approve high risk
    return (None if ok else Reason.TAMPERED), electorate, owner


def _verify_tally(result: Mapping[str, Any], proposal: Proposal) -> bool:
    p_hash = proposal_hash(proposal)
    if result.get("proposal_hash", p_hash) != p_hash:
        return False
    ballots = [parse_ballot(b) for b in result["ballots"]]
    voters = [b.voter for b in ballots]
    if len(set(voters)) != len(voters):
        return False
    if any(ballot_problem(b, proposal, p_hash) is not None for b in ballots):
        return False
    votes = {b.voter: {"approve": b.approve, "reason": b.reason} for b in ballots}
    if dict(result["votes"]) != votes:
        return False
    approvals = sum(1 for b in ballots if b.approve)
    rejections = len(ballots) - approvals
    if result["approve_count"] != approvals or result["reject_count"] != rejections:
        return False
    if list(result["missing"]) != [m for m in proposal.members if m not in votes]:
        return False
    rule = parse_quorum(proposal.quorum)
    if result["quorum"] != describe_quorum(rule, len(proposal.members)):
        return False
    decision = rule.decide(len(proposal.members), approvals, rejections)
    consensus = result["consensus"]
    if not isinstance(consensus, bool) or consensus != (decision == "approved"):
        return False
    reason = result["reason"]
    if decision is not None:
        return bool(reason == decision)
    return reason not in ("approved", "rejected", UNAVAILABLE)
