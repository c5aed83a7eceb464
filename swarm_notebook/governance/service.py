"""Consensus on the swarm: putting a modification to a vote and voting on peers' ones.

Who votes: in a room with a roster (``Electorate``), the roster's members, connected or
not (the quorum is over the roster; peers off the roster never vote, their ballots are
``non-member``). In an *open* room (no roster), the authenticated peers connected when
the proposal is made, and a high-risk proposal is refused with ``no-roster``: new keys
cost nothing, so an open room cannot be trusted with what matters.
The proposer does not vote on its own change (peers approve a risky modification; a
proposer's self-approval would let a two-peer swarm pass anything by itself).

Wire messages (all bodies schema-checked):

* ``consensus-proposal`` (request): ``{"proposal": <signed Proposal>, "modification":
  {...}}``; a member answers with its signed ballot, or refuses with a reason
  (``non-member``, ``bad-signature``, ``late``, ``busy``, ``rate-limited``...).
* ``consensus-ballot`` (one-way): ``{"ballot": <signed Ballot>}`` — a ballot may also
  arrive on its own; it is counted by the same ``Tally``, so forged, duplicate, late and
  non-member ballots are ignored and reported in the result.
* ``roster-update`` (one-way): ``{"roster": <owner-signed Roster>}``, sent to each peer
  as its link comes up; adopted only when signed by the owner the receiver trusts.

Nothing in a proposal is executed: voters only read the code as text.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from swarm_notebook._util.ratelimit import TokenBuckets
from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import (
    ConsensusError,
    HandlerRefusal,
    PeerUnavailable,
    RemoteError,
    RequestTimeout,
)
from swarm_notebook.governance import (
    DEFAULT_CORE_FILES,
    DefaultVotePolicy,
    Modification,
    Proposal,
    Quorum,
    StrictMajority,
    Tally,
    VotePolicy,
    assess_modification_risk,
    make_proposal,
    parse_modification,
    parse_proposal,
    parse_quorum,
    respond_to_proposal,
    roster_electorate,
    split_members,
    unavailable_result,
)
from swarm_notebook.governance.electorate import Electorate
from swarm_notebook.ledger.audit import AuditLog
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.reasons import Reason

log = logging.getLogger(__name__)

CONSENSUS_PROPOSAL = "consensus-proposal"
CONSENSUS_BALLOT = "consensus-ballot"
ROSTER_UPDATE = "roster-update"
NO_QUORUM = "no-quorum"
QUORUM_UNREACHABLE = "quorum-unreachable"

Notify = Callable[[str, dict[str, Any]], None]


@dataclass
class ConsensusConfig:
    timeout_s: float = 30.0
    quorum: str = "majority"  # "majority" | "unanimous" | "threshold:K"
    # The blueprint answers ``consensus: True`` when the swarm is unavailable; set this to
    # refuse instead (fail closed).
    fail_closed: bool = False
    # Glob patterns of the room's core paths, whose change is high risk (``risk.is_core_file``
    # says how they match). None: ``risk.DEFAULT_CORE_FILES``, a data team's dependency
    # files, CI configuration and package entry points.
    core_files: tuple[str, ...] | None = None


class ProposalMessage(msgspec.Struct, forbid_unknown_fields=True):
    proposal: dict[str, Any]
    modification: dict[str, Any]


class BallotMessage(msgspec.Struct, forbid_unknown_fields=True):
    ballot: dict[str, Any]


class RosterMessage(msgspec.Struct, forbid_unknown_fields=True):
    roster: dict[str, Any]


def quorum_rule(setting: str) -> Quorum:
    """The rule named by ``ConsensusConfig.quorum``: ``"majority"`` (strict majority),
    ``"unanimous"`` or ``"threshold:K"``.

    >>> quorum_rule("threshold:2").spec
    'threshold:2'
    """
    if setting in ("majority", "strict-majority"):
        return StrictMajority()
    return parse_quorum(setting)


@dataclass
class _Open:
    """A proposal of ours still being voted on."""

    proposal: Proposal
    tally: Tally
    ignored_members: list[dict[str, str]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answered: set[str] = field(default_factory=set)
    member_errors: dict[str, str] = field(default_factory=dict)


class ConsensusService:
    """Requests consensus for modifications and votes on peers' proposals.

    ``vote_policy`` may be replaced at any time (its ``decide`` may be async, e.g. a
    human asked in the notebook). The audit log belongs to the caller.

    >>> result = await coordinator.request_modification_consensus(
    ...     {"file_path": "analysis/clean.py", "code": "df = df.dropna()",
    ...      "operation": "MODIFY", "reason": "drop empty rows"})        # doctest: +SKIP
    >>> result["consensus"], result["reason"]                            # doctest: +SKIP
    (True, 'approved')
    """

    def __init__(
        self,
        *,
        node: SwarmNode,
        audit: AuditLog,
        stats: CoordinationStats,
        notify: Notify,
        settings: ConsensusConfig,
        is_initialized: Callable[[], bool],
        max_open_proposals: int = 32,
        max_concurrent_votes: int = 16,
        max_records: int = 1000,
        proposal_rate_per_s: float = 2.0,
        proposal_burst: float = 10.0,
        ballot_rate_per_s: float = 8.0,
        ballot_burst: float = 32.0,
        electorate: Electorate | None = None,
    ) -> None:
        self.node = node
        self.electorate = electorate or Electorate(node.identity, "default")
        self.audit = audit
        self.stats = stats
        self.settings = settings
        self._notify = notify
        self._is_initialized = is_initialized
        self.core_files: tuple[str, ...] = tuple(
            DEFAULT_CORE_FILES if settings.core_files is None else settings.core_files
        )
        self.vote_policy: VotePolicy = DefaultVotePolicy(self.core_files)
        self.max_open_proposals = max_open_proposals
        self.max_concurrent_votes = max_concurrent_votes
        self._open: dict[str, _Open] = {}
        self._voting: set[tuple[str, str]] = set()
        self._cast: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self._latest: dict[str, Any] | None = None
        self._proposal_rate = TokenBuckets(proposal_rate_per_s, proposal_burst, 1024)
        self._ballot_rate = TokenBuckets(ballot_rate_per_s, ballot_burst, 1024)
        self.rejections: Counter[str] = Counter()
        # Refused on our side while proposing (no peer asked us anything): a bad member id,
        # a high-risk change in an open room. Handler refusals are counted by the endpoint.
        self.request_refusals: Counter[str] = Counter()
        self._tasks = OwnedTasks("consensus-service")
        self._closed = False
        node.endpoint.register_message_handler(
            CONSENSUS_PROPOSAL, self._on_proposal, schema=ProposalMessage
        )
        node.endpoint.register_message_handler(
            CONSENSUS_BALLOT, self._on_ballot, schema=BallotMessage
        )
        node.endpoint.register_message_handler(ROSTER_UPDATE, self._on_roster, schema=RosterMessage)
        node.add_listener(self._peer_changed)

    # -- helpers -----------------------------------------------------------------------

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        try:
            self._notify(event, payload)
        except Exception:
            log.exception("notify %s failed", event)

    def _refuse(self, reason: str, message: str) -> HandlerRefusal:
        self.rejections[reason] += 1
        self.stats.messages_rejected += 1
        return HandlerRefusal(reason, message)

    def assess_modification_risk(self, modification: dict[str, Any]) -> str:
        """``"high"``, ``"medium"`` or ``"low"`` (core files, deletes and eval/exec are high).

        >>> coordinator.assess_modification_risk(
        ...     {"file_path": "pyproject.toml", "code": "x = 1"})          # doctest: +SKIP
        'high'
        """
        return assess_modification_risk(modification, self.core_files)

    # -- proposing ---------------------------------------------------------------------

    async def request_modification_consensus(self, modification: dict[str, Any]) -> dict[str, Any]:
        """Ask the connected peers to vote on ``modification`` and wait for the outcome.

        ``modification`` is ``{"file_path", "code", "operation": CREATE|MODIFY|DELETE,
        "reason"}``. The result has ``consensus`` (bool), ``reason`` (``approved``,
        ``rejected``, ``timeout``, ``no-quorum`` when every member answered without a
        decision, ``quorum-unreachable``, or ``swarm-not-available``), the signed
        ``ballots`` and ``proposal`` (re-check with ``verify_consensus``), ``votes``,
        ``ignored`` ballots with why, ``missing`` members and ``member_errors``.

        With no swarm (not initialised, or no connected peer) the answer is the
        blueprint's fallback ``consensus: True, reason: "swarm-not-available"``, or
        ``False`` with ``ConsensusConfig.fail_closed``. A malformed modification
        raises ``ModificationRejected``; too many open proposals raise ``ConsensusError``.
        """
        if self._closed:
            raise ConsensusError(Reason.CLOSED, "the consensus service is closed")
        self.stats.consensus_requests += 1
        self.stats.touch("consensus")
        mod = parse_modification(modification)
        risk = assess_modification_risk(mod, self.core_files)
        created_at = time.time()
        roster = self.electorate.roster
        connected = sorted(self.node.connected_peers()) if self._is_initialized() else []
        # An id that is not a key's canonical spelling is reported, never raised: one peer
        # linked under a bad id must not stop every vote.
        good, bad = split_members(connected)
        ignored_members = [{"peer_id": peer[:64], "reason": Reason.BAD_ID.value} for peer in bad]
        if bad:
            self.request_refusals[Reason.BAD_ID] += len(bad)
        local_id = f"local-{secrets.token_hex(8)}"
        if not self._is_initialized() or (roster is None and not connected):
            result = unavailable_result(self.settings.fail_closed)
            return self._finish(local_id, mod, risk, created_at, result)
        if roster is None and risk == "high":
            self.request_refusals[Reason.NO_ROSTER] += 1
            result = unavailable_result(fail_closed=True)
            result["reason"] = Reason.NO_ROSTER.value
            result["electorate"] = "open"
            result["ignored_members"] = ignored_members
            return self._finish(local_id, mod, risk, created_at, result)
        members = list(roster_electorate(roster, self.node.local_id)) if roster else good
        rule = quorum_rule(self.settings.quorum)
        if not members or rule.needed(len(members)) > len(members):
            result = unavailable_result(fail_closed=True)
            result["reason"] = QUORUM_UNREACHABLE
            result["quorum"] = {"rule": rule.spec, "members": len(members)}
            result["electorate"] = "open" if roster is None else "roster"
            result["ignored_members"] = ignored_members
            return self._finish(local_id, mod, risk, created_at, result)
        if len(self._open) >= self.max_open_proposals:
            raise ConsensusError(
                Reason.TOO_MANY_PROPOSALS, f"{len(self._open)} proposals are still being voted on"
            )
        proposal = make_proposal(
            self.node.identity,
            mod,
            members,
            now=created_at,
            timeout_s=self.settings.timeout_s,
            quorum=rule,
            core_files=self.core_files,
            roster=roster,
        )
        state = _Open(proposal, Tally(proposal, roster=roster), ignored_members=ignored_members)
        self._open[proposal.id] = state
        self.audit.record_quietly(
            "proposal-created",
            peer=None,
            outcome="sent",
            detail={
                "proposal_id": proposal.id,
                "target": proposal.target,
                "risk": proposal.risk,
                "members": list(proposal.members),
                "quorum": proposal.quorum,
            },
        )
        body = {"proposal": msgspec.to_builtins(proposal), "modification": msgspec.to_builtins(mod)}
        asks = [
            self._tasks.spawn(self._ask(state, member, body), name="consensus-ask")
            for member in proposal.members
        ]
        try:
            remaining = max(0.0, proposal.deadline - time.time())
            try:
                await asyncio.wait_for(state.done.wait(), remaining)
            except TimeoutError:
                pass
        finally:
            # Decided or out of time: stop asking (this also cancels voters still thinking).
            for task in asks:
                task.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
            self._open.pop(proposal.id, None)
        if state.tally.decided:
            result = state.tally.result()
        elif self._closed:
            result = state.tally.result(reason="closed")
        elif len(state.answered) >= len(proposal.members) and time.time() < proposal.deadline:
            result = state.tally.result(reason=NO_QUORUM)
        else:
            result = state.tally.result(reason="timeout")
        result["member_errors"] = dict(state.member_errors)
        result["ignored_members"] = list(state.ignored_members)
        return self._finish(proposal.id, mod, risk, created_at, result)

    async def _ask(self, state: _Open, member: str, body: dict[str, Any]) -> None:
        timeout = max(0.001, state.proposal.deadline - time.time())
        try:
            reply = await self.node.endpoint.request(
                member, CONSENSUS_PROPOSAL, body, timeout=timeout
            )
        except RequestTimeout:
            state.member_errors[member] = "timeout"
            return
        except RemoteError as exc:
            state.member_errors[member] = exc.reason
            if exc.reason == "late":
                return  # the voter ran out of time: that is a timeout, not an answer
        except PeerUnavailable:
            state.member_errors[member] = "peer-unavailable"
        else:
            self._count(state, member, reply)
        state.answered.add(member)
        if len(state.answered) >= len(state.proposal.members):
            state.done.set()

    def _count(self, state: _Open, sender: str, ballot: Any) -> None:
        tally = state.tally
        before = Counter(tally.ignored_counts)
        counted = tally.add(ballot, now=time.time())
        if counted:
            outcome = "counted"
        else:
            grown = tally.ignored_counts - before
            outcome = f"ignored:{next(iter(grown), 'unknown')}"
        voter = ballot.get("voter") if isinstance(ballot, dict) else None
        approve = ballot.get("approve") if isinstance(ballot, dict) else None
        self.audit.record_quietly(
            "ballot-received",
            peer=sender,
            outcome=outcome,
            detail={
                "proposal_id": state.proposal.id,
                "voter": voter if isinstance(voter, str) else None,
                "approve": approve if isinstance(approve, bool) else None,
            },
        )
        if counted and isinstance(voter, str):
            state.answered.add(voter)
        if tally.decided:
            state.done.set()

    def _on_ballot(self, peer_id: str, body: BallotMessage) -> None:
        if not self._ballot_rate.take(peer_id, time.monotonic()):
            raise self._refuse("rate-limited", "too many ballots")
        proposal_id = body.ballot.get("proposal_id")
        state = self._open.get(proposal_id) if isinstance(proposal_id, str) else None
        if state is None:
            raise self._refuse("unknown-proposal", "no open proposal with that id")
        self._count(state, peer_id, body.ballot)

    def _finish(
        self,
        proposal_id: str,
        mod: Modification,
        risk: str,
        created_at: float,
        result: dict[str, Any],
    ) -> dict[str, Any]:
        decided_at = time.time()
        row = {
            "proposal_id": proposal_id,
            "target": mod.file_path,
            "risk": risk,
            "consensus": result["consensus"],
            "reason": result["reason"],
            "approve_count": result["approve_count"],
            "reject_count": result["reject_count"],
            "missing": list(result["missing"]),
            "created_at": created_at,
            "decided_at": decided_at,
        }
        self._records.append(row)
        self._latest = {**row, "votes": dict(result["votes"])}
        self.audit.record_quietly(
            "consensus-result",
            peer=None,
            outcome=str(result["reason"]),
            detail={
                "proposal_id": proposal_id,
                "consensus": result["consensus"],
                "approve_count": result["approve_count"],
                "reject_count": result["reject_count"],
                "missing": len(result["missing"]),
                "ignored": dict(result["ignored_counts"]),
            },
        )
        self._emit("swarm:consensus-result", result)
        return result

    # -- voting ------------------------------------------------------------------------

    async def _on_proposal(self, peer_id: str, body: ProposalMessage) -> dict[str, Any]:
        if not self._is_initialized():
            raise self._refuse("not-initialized", "this peer does not vote yet")
        if not self._proposal_rate.take(peer_id, time.monotonic()):
            raise self._refuse("rate-limited", "too many proposals")
        try:
            proposal = parse_proposal(body.proposal)
        except ConsensusError as exc:
            raise self._refuse(exc.reason, exc.message) from None
        if proposal.proposer != peer_id:
            raise self._refuse("proposer-mismatch", "the proposal was not made by the sender")
        if proposal.roster != self.electorate.hash():
            # A proposer with another (or no) roster is not asking our electorate.
            raise self._refuse(Reason.ROSTER_MISMATCH, "the proposal is not for our roster")
        if not proposal.roster and self._open_room_risk(body.modification) == "high":
            raise self._refuse(Reason.NO_ROSTER, "high-risk proposals need a room roster")
        key = (proposal.proposer, proposal.id)
        cached = self._cast.get(key)
        if cached is not None:
            return cached  # one ballot per member, even when the proposer asks again
        if key in self._voting:
            raise self._refuse("duplicate-proposal", "already deciding on this proposal")
        if len(self._voting) >= self.max_concurrent_votes:
            raise self._refuse("busy", "too many proposals being decided")
        now = time.time()
        self._voting.add(key)
        try:
            ballot = await asyncio.wait_for(
                respond_to_proposal(
                    self.node.identity,
                    proposal,
                    body.modification,
                    self.vote_policy,
                    now,
                    clock=time.time,
                ),
                timeout=max(0.0, proposal.deadline - now),
            )
        except ConsensusError as exc:
            self.audit.record_quietly(
                "ballot-cast",
                peer=peer_id,
                outcome=f"refused:{exc.reason}",
                detail={"proposal_id": proposal.id},
            )
            raise self._refuse(exc.reason, exc.message) from None
        except TimeoutError:
            raise self._refuse("late", "no decision before the proposal's deadline") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("vote policy failed")
            raise self._refuse("policy-error", f"{type(exc).__name__}: {exc}"[:300]) from None
        finally:
            self._voting.discard(key)
        answer: dict[str, Any] = msgspec.to_builtins(ballot)
        self._cast[key] = answer
        while len(self._cast) > 1024:
            self._cast.popitem(last=False)
        self.audit.record_quietly(
            "ballot-cast",
            peer=peer_id,
            outcome="approve" if ballot.approve else "reject",
            detail={"proposal_id": proposal.id, "target": proposal.target, "reason": ballot.reason},
        )
        return answer

    def _open_room_risk(self, modification: dict[str, Any]) -> str:
        try:
            return assess_modification_risk(modification, self.core_files)
        except ValueError:
            return "low"  # respond_to_proposal answers a malformed one with content-mismatch

    # -- roster ------------------------------------------------------------------------

    def _peer_changed(self, peer_id: str, what: str) -> None:
        if what == "up" and self.electorate.roster is not None and not self._closed:
            self._tasks.spawn(self._send_roster(peer_id), name="roster-send")

    async def _send_roster(self, peer_id: str) -> None:
        body = self.electorate.as_dict()
        if body is None:
            return
        try:
            await self.node.endpoint.send(peer_id, ROSTER_UPDATE, {"roster": body})
        except PeerUnavailable:
            pass  # it will get it when its link comes back

    def _on_roster(self, peer_id: str, body: RosterMessage) -> None:
        if not self._ballot_rate.take(peer_id, time.monotonic()):
            raise self._refuse("rate-limited", "too many rosters")  # each costs a verify
        problem = self.electorate.offer(body.roster, peer_id)
        if problem is not None:
            self.stats.messages_rejected += 1  # counted by reason in electorate.rejections
            raise HandlerRefusal(problem, f"roster refused: {problem}")
        self._emit("stats:changed", {"cause": "roster"})

    async def share_roster(self) -> int:
        """Send the roster to every connected peer (after a local change); returns how many."""
        peers = self.node.connected_peers()
        for peer in peers:
            await self._send_roster(peer)
        return len(peers)

    # -- views -------------------------------------------------------------------------

    def consensus_records(self) -> list[dict[str, Any]]:
        """Rows for ``consensus_frame``, oldest first."""
        return [dict(row) for row in self._records]

    def latest(self) -> dict[str, Any] | None:
        """The last decision, for the dashboard."""
        return None if self._latest is None else dict(self._latest)

    async def close(self) -> None:
        """Stop asking and voting; proposals still open end with reason ``closed``."""
        self._closed = True
        for type_ in (CONSENSUS_PROPOSAL, CONSENSUS_BALLOT, ROSTER_UPDATE):
            self.node.endpoint.unregister_message_handler(type_)
        await self._tasks.close()
        for state in self._open.values():
            state.done.set()
