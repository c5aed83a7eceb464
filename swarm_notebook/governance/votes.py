"""How this peer votes on a proposal.

A ``VotePolicy`` returns ``(approve, reason)``; ``decide`` may also be ``async def``
(return an awaitable), so a policy that asks a human in the notebook fits the same
protocol. ``respond_to_proposal`` does the checks every voter must make before any
policy runs, then signs the ballot.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from swarm_notebook.errors import ConsensusError
from swarm_notebook.governance.consensus import (
    Ballot,
    Proposal,
    cast_ballot,
    modification_matches,
    proposal_problem,
)
from swarm_notebook.governance.risk import (
    DEFAULT_CORE_FILES,
    Modification,
    assess_modification_risk,
    dynamic_code_findings,
    is_core_file,
    parse_modification,
)
from swarm_notebook.identity import Identity
from swarm_notebook.reasons import Reason

Vote = tuple[bool, str]


class VotePolicy(Protocol):
    """Decides a vote. ``decide`` returns ``(approve, reason)`` or an awaitable of it."""

    def decide(self, proposal: Proposal, modification: Modification) -> Vote | Awaitable[Vote]: ...


class DefaultVotePolicy:
    """The vote a peer casts unless its owner configures another policy.

    Rules, first match wins (risk is assessed here from the code itself, never taken
    from the proposer's label):

    1. code that runs code it builds (eval/exec and the rest of ``risk``'s list) is refused;
    2. deleting a core file is refused;
    3. medium and low risk changes are approved;
    4. other high-risk changes (editing or creating a core file, deleting a non-core
       file) are approved only with a rationale of at least ``min_rationale`` non-blank
       characters, so a risky change always comes with an explanation on record.
    """

    def __init__(
        self, core_files: Iterable[str] = DEFAULT_CORE_FILES, *, min_rationale: int = 10
    ) -> None:
        self.core_files = tuple(core_files)
        self.min_rationale = min_rationale

    def decide(self, proposal: Proposal, modification: Modification) -> Vote:
        findings = dynamic_code_findings(modification.code, modification.file_path)
        if findings:
            # The prefix is stable (notebooks and callers match on it); the finding says why.
            return False, f"refused: the code calls eval()/exec() or the like ({findings[0]})"
        risk = assess_modification_risk(modification, self.core_files)
        core = is_core_file(modification.file_path, self.core_files)
        if modification.operation == "DELETE" and core:
            return False, "refused: deleting a core file"
        if risk != "high":
            return True, f"approved: {risk} risk"
        rationale = (proposal.rationale or modification.reason).strip()
        if len(rationale) < self.min_rationale:
            return False, "refused: high-risk change without a rationale"
        return True, "approved: high risk with a rationale"


async def respond_to_proposal(
    identity: Identity,
    proposal: Proposal,
    modification: Modification | dict[str, Any],
    policy: VotePolicy,
    now: float,
    *,
    clock: Callable[[], float] | None = None,
) -> Ballot:
    """Check a received proposal, ask ``policy`` and sign the ballot.

    Raises ``ConsensusError`` (no ballot is sent) when the proposal does not verify
    (``bad-signature``...), when this peer is not a member (``non-member``) or when the
    deadline has passed (``late``). A modification that does not match the proposal's
    hash gets a signed rejection (reason ``content-mismatch``) without asking the policy.
    ``now`` is when the proposal was received; the ballot's ``cast_at`` is ``clock()``
    after the policy answered (a human may take a while), or ``now`` without a clock.
    """
    problem = proposal_problem(proposal)
    if problem is not None:
        raise ConsensusError(problem, "the proposal does not verify")
    if identity.peer_id not in proposal.members:
        raise ConsensusError(Reason.NON_MEMBER, "this peer is not in the proposal's members")
    if now > proposal.deadline:
        raise ConsensusError(Reason.LATE, "the proposal's deadline has passed")
    try:
        mod = parse_modification(modification)
    except ValueError:
        return cast_ballot(identity, proposal, False, "content-mismatch: bad modification", now)
    if not modification_matches(proposal, mod):
        return cast_ballot(identity, proposal, False, "content-mismatch", now)
    decided = policy.decide(proposal, mod)
    if inspect.isawaitable(decided):
        decided = await decided
    approve, reason = decided
    cast_at = now if clock is None else clock()
    return cast_ballot(identity, proposal, bool(approve), str(reason), cast_at)
