"""The notebook voter: a person approves or rejects with real widget buttons."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.governance.consensus import verify_consensus
from swarm_notebook.governance.service import ConsensusConfig
from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import make_roster, save_roster
from swarm_notebook.notebook.voter import NotebookVoter
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport

RISKY = {
    "file_path": "swarm_notebook/transport/<script>mesh.py",
    "code": "def f():\n    return 1\n",
    "operation": "MODIFY",
    "reason": "simplify the mesh",
}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SwarmCoordinator, SwarmCoordinator]]:
    net = MemoryNetwork()
    peers = []
    identities = {name: Identity.generate() for name in ("proposer", "voter")}
    # RISKY is high risk: it is only put to a vote in a room with a roster.
    roster = make_roster(
        identities["proposer"], "default", {i.peer_id: n for n, i in identities.items()}
    )
    for name, identity in identities.items():
        save_roster(tmp_path / name, roster)
        config = CoordinatorConfig(name=name, consensus=ConsensusConfig(timeout_s=10))
        transport = MemoryTransport(identity, net, "room")
        peers.append(SwarmCoordinator(identity, transport, config, tmp_path / name, EventBus()))
    for p in peers:
        await p.start()
    yield peers[0], peers[1]
    for p in peers:
        await p.leave()


async def wait_for_card(voter: NotebookVoter, count: int) -> None:
    # The voter has no event of its own for a new card; poll its state briefly.
    async with asyncio.timeout(5):
        while len(voter.cards) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_person_decides_and_their_reason_is_on_the_signed_ballot(
    pair: tuple[SwarmCoordinator, SwarmCoordinator],
) -> None:
    proposer, member = pair
    voter = NotebookVoter(timeout_s=8)
    member.consensus.vote_policy = voter

    pending = asyncio.create_task(proposer.consensus.request_modification_consensus(RISKY))
    await wait_for_card(voter, 1)
    card = next(iter(voter.cards.values()))
    header, _rationale, code, buttons, status = card.children
    # Peer-supplied text is shown as text: the target's markup stays literal.
    # An ordinary code change (not a core path of the room): medium risk, asked in an open room.
    assert "<script>mesh.py" in header.value and "medium risk" in header.value
    assert code.value == RISKY["code"] and code.disabled
    approve, reject, _reason = buttons.children
    reject.click()  # nothing may change after the first answer
    result = await pending
    assert result["consensus"] is False and result["reason"] == "rejected"
    assert result["votes"][member.local_id] == {
        "approve": False,
        "reason": "rejected in the notebook",
    }
    assert verify_consensus(result)
    assert all(b.disabled for b in (approve, reject)) and status.value.startswith("rejected")

    pending = asyncio.create_task(
        proposer.consensus.request_modification_consensus(
            {**RISKY, "code": "def g():\n    return 2\n"}
        )
    )
    await wait_for_card(voter, 2)
    card = list(voter.cards.values())[1]
    card.children[3].children[2].value = "looks right to me"
    card.children[3].children[0].click()
    result = await pending
    assert result["consensus"] is True
    assert result["votes"][member.local_id]["reason"] == "looks right to me"


async def test_no_answer_falls_back_to_the_default_policy_and_says_so(
    pair: tuple[SwarmCoordinator, SwarmCoordinator],
) -> None:
    proposer, member = pair
    member.consensus.vote_policy = NotebookVoter(timeout_s=0.3)
    result = await proposer.consensus.request_modification_consensus(
        {**RISKY, "code": "eval(input())\n"}
    )
    assert result["consensus"] is False
    reason = result["votes"][member.local_id]["reason"]
    assert reason.startswith("no answer from the notebook") and "eval" in reason


async def test_the_ballot_names_the_proposer_by_its_card(
    pair: tuple[SwarmCoordinator, SwarmCoordinator],
) -> None:
    proposer, member = pair
    voter = NotebookVoter(timeout_s=8)
    voter.bind_names(member.peer_name)  # what Coordinator.set_vote_policy does
    member.consensus.vote_policy = voter
    pending = asyncio.create_task(proposer.consensus.request_modification_consensus(RISKY))
    await wait_for_card(voter, 1)
    header = next(iter(voter.cards.values())).children[0]
    assert f"from proposer ({proposer.local_id[:16]}…)" in header.value
    next(iter(voter.cards.values())).children[3].children[0].click()
    assert (await pending)["consensus"] is True
