"""Issue 10, findings 1 and 2 as regression tests: one key one id, votes only from members,
and a peer whose key is used elsewhere keeps its place.

The signaling server runs on loopback in this process; peers, workers and the attacker
(``tests/support/impostor.py``, ``knowledge_peer.py``) are separate processes.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_notebook.client import join
from swarm_notebook.errors import CardError, ReflectionRejected, RosterError
from swarm_notebook.governance import (
    Proposal,
    Tally,
    cast_ballot,
    make_proposal,
    verify_consensus,
)
from swarm_notebook.governance.electorate import Electorate
from swarm_notebook.identity import Identity, is_canonical_peer_id, verify_signature
from swarm_notebook.knowledge import encode_reflection, sign_reflection
from swarm_notebook.knowledge.gate import SharedReflectionGate
from swarm_notebook.knowledge.reflections import signing_payload
from swarm_notebook.membership.agent_card import make_card, verify_card
from swarm_notebook.membership.roster import make_roster, save_roster
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.transport import link_auth
from tests.support.procs import PeerProcess, WorkerProcess, child_processes
from tests.support.spellings import lenient_verify, other_spellings
from tests.test_knowledge_consensus import (
    audit_outcomes,
    pid,
    start_peer,
    stop_all,
    wait_connected,
    wait_event,
)

pytestmark = pytest.mark.timeout(180)

EVAL_IN_CORE = {
    "file_path": "swarm_notebook/membership/node.py",
    "code": "eval(msg)",
    "reason": "a very convincing rationale",
}


def put_on_roster(room: str, *profiles: Path) -> Identity:
    """Keys for ``profiles`` and a roster owned by the first, saved in every profile."""
    ids = [Identity.load_or_create(p) for p in profiles]
    names = {i.peer_id: p.name for i, p in zip(ids, profiles, strict=True)}
    roster = make_roster(ids[0], room, names)
    for p in profiles:
        save_roster(p, roster)
    return ids[0]


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- finding 1: one key, one id ----------------------------------------------------------


def test_a_key_has_exactly_one_valid_spelling() -> None:
    me = Identity.generate()
    spellings = other_spellings(me.peer_id)
    assert len(spellings) == 17  # 15 other endings, upper case, mixed case
    signature = me.sign(b"data")
    assert verify_signature(me.peer_id, signature, b"data")
    assert [s for s in spellings if is_canonical_peer_id(s)] == []
    assert [s for s in spellings if verify_signature(s, signature, b"data")] == []


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=32, max_size=32), junk=st.text(max_size=80))
def test_exactly_one_string_per_key_is_an_id(raw: bytes, junk: str) -> None:
    canonical = base64.b32encode(raw).decode().rstrip("=").lower()
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return  # not a curve point: no id at all
    assert is_canonical_peer_id(canonical)
    assert not any(is_canonical_peer_id(s) for s in other_spellings(canonical))
    assert is_canonical_peer_id(junk) == (junk == canonical)  # never raises on junk


def test_link_auth_refuses_a_non_canonical_id_even_with_a_valid_signature() -> None:
    me = Identity.generate()
    upper = me.peer_id.upper()
    data = link_auth.transcript(
        session="s",
        offerer=upper,
        answerer="x" * 52,
        offerer_nonce="n" * 16,
        answerer_nonce="m" * 16,
        offer_fingerprints="sha-256 AA",
        answer_fingerprints="sha-256 BB",
    )
    signature = me.sign(data)
    assert link_auth.link_id_problem(upper) == "bad-id"
    assert not link_auth.verify_transcript(upper, signature, data)
    assert link_auth.verify_transcript(me.peer_id, signature, data)


def test_cards_and_reflections_under_another_spelling_are_refused_bad_id() -> None:
    me = Identity.generate()
    # A lower-case spelling that differs only in the ignored low bits: the hardest one.
    alias = Identity(private_key=me.private_key, peer_id=other_spellings(me.peer_id)[0])
    card = make_card(
        alias, name="w", version="1", capabilities=["x"], concurrency=1, limits={}, seq=1
    )
    with pytest.raises(CardError) as refused:
        verify_card(card, alias.peer_id)
    assert refused.value.reason == "bad-id"
    gate = SharedReflectionGate()
    lesson = {"category": "pandas", "description": "merge validates", "outcome": "successful"}
    honest = sign_reflection(me, **lesson)
    # Signed by the real key under the alias: it verified before the fix.
    unsigned = msgspec.structs.replace(honest, author=alias.peer_id, signature="")
    forged = msgspec.structs.replace(unsigned, signature=me.sign(signing_payload(unsigned)).hex())
    with pytest.raises(ReflectionRejected) as rejected:
        gate.check(alias.peer_id, encode_reflection(forged), now=time.time())
    assert rejected.value.reason == "bad-id" and gate.rejections == {"bad-id": 1}
    assert gate.check(me.peer_id, encode_reflection(honest), now=time.time()).author == me.peer_id


async def test_the_server_admits_one_of_17_spellings_of_a_real_key(
    server: SignalingServer, tmp_path: Path
) -> None:
    honest = await start_peer(server.url, tmp_path / "honest", "honest", "--room", "lab")
    attacker = await PeerProcess.start(
        "impostor.py",
        *("--signaling", server.url, "--room", "lab", "--profile", str(tmp_path / "evil")),
        *("--mode", "spellings"),
        name="impostor",
    )
    try:
        joins = await attacker.wait_for(lambda e: e.get("event") == "joins", 30)
        assert joins["tried"] == 18 and len(joins["admitted"]) == 1
        assert is_canonical_peer_id(joins["admitted"][0])
        assert joins["refused"] == {"bad-id": 17}
        stats = server.stats()
        assert stats["rejections"]["bad-id"] == 17
        assert stats["peers"] == 2  # the honest peer and the attacker's one real id
        # The honest peer was never disturbed and still answers.
        assert (await honest.call("peers"))["connected"] == []
    finally:
        await stop_all([honest, attacker])
    assert child_processes() == []


async def test_peers_refuse_non_canonical_ids_that_a_lenient_server_lets_in(
    server: SignalingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for an old or hostile signaling server: it skips the canonical-id check.
    monkeypatch.setattr("swarm_notebook.signaling.server.is_canonical_peer_id", lambda _: True)
    monkeypatch.setattr("swarm_notebook.signaling.server.verify_signature", lenient_verify)
    honest = await start_peer(server.url, tmp_path / "honest", "honest", "--room", "lab")
    attacker = await PeerProcess.start(
        "impostor.py",
        *("--signaling", server.url, "--room", "lab", "--profile", str(tmp_path / "evil")),
        *("--mode", "spellings"),
        name="impostor",
    )
    try:
        joins = await attacker.wait_for(lambda e: e.get("event") == "joins", 30)
        assert len(joins["admitted"]) == 18  # the lenient server let every spelling in
        deadline = time.monotonic() + 20
        while True:
            stats = (await honest.call("transport-stats"))["stats"]
            if stats["rejections"].get("bad-id", 0) >= 17 or time.monotonic() > deadline:
                break
        # The peer refused to dial any of the 17 other spellings, however announced.
        assert stats["rejections"]["bad-id"] == 17
        assert stats["dials"] <= 1  # at most the one canonical id
    finally:
        await stop_all([honest, attacker])
    assert child_processes() == []


# -- finding 2: votes only from members ----------------------------------------------------


async def test_spellings_and_throwaway_keys_cannot_outvote_roster_members(
    server: SignalingServer, tmp_path: Path
) -> None:
    owner = put_on_roster("test", *(tmp_path / n for n in ("a", "b", "c")))
    a, b, c, outsider = await asyncio.gather(
        *(start_peer(server.url, tmp_path / n, n) for n in ("a", "b", "c", "outsider"))
    )
    peers = [a, b, c, outsider]
    try:
        for p in peers:
            await wait_connected(p, 3)
        # The roster reached everyone; the outsider trusts no owner, so it keeps none.
        assert (await b.call("roster"))["roster"]["electorate"] == "roster"
        assert (await outsider.call("roster"))["roster"]["electorate"] == "open"

        # The two honest members hold their votes while the attacker approves with three
        # spellings of its key and three throwaway keys.
        await b.call("hold-votes")
        await c.call("hold-votes")
        mark = len(b.events)
        asking = asyncio.create_task(a.call("consensus", modification=EVAL_IN_CORE, timeout=60))
        await wait_event(b, mark, event="vote-asked")
        proposal = (await b.call("held-proposal"))["proposal"]
        assert sorted(proposal["members"]) == sorted([pid(b), pid(c)])
        spelled, thrown = [
            await outsider.call("cast-ballots", peer=pid(a), proposal=proposal, **{"as": kind})
            for kind in ("spellings", "throwaway")
        ]
        assert not asking.done()  # six approvals and nothing decided
        await b.call("release-votes")
        await c.call("release-votes")
        result = (await asking)["result"]

        assert (result["consensus"], result["reason"]) == (False, "rejected")
        assert result["electorate"] == "roster" and result["roster"]["owner"] == owner.peer_id
        assert result["ignored_counts"] == {"bad-id": 3, "non-member": 3}
        ignored = {(i["voter"], i["reason"]) for i in result["ignored"]}
        assert ignored == {(v, "bad-id") for v in spelled["voters"]} | {
            (v, "non-member") for v in thrown["voters"]
        }
        assert set(result["votes"]) <= {pid(b), pid(c)}
        assert verify_consensus(result, trusted_owner=owner.peer_id)
        assert verify_consensus(result, detail=True)["electorate"] == "roster"
        assert (await audit_outcomes(a, "ballot-received")).count("ignored:non-member") == 3

        # Offline forgery 1: swap the members' ballots for the throwaway approvals.
        forged = copy.deepcopy(result)
        fakes = [Identity.generate() for _ in range(2)]
        prop = msgspec.convert(result["proposal"], type=Proposal)
        ballots = [cast_ballot(k, prop, True, "yes", prop.created_at + 1) for k in fakes]
        forged["ballots"] = [msgspec.to_builtins(x) for x in ballots]
        forged["votes"] = {x.voter: {"approve": True, "reason": "yes"} for x in ballots}
        forged.update(consensus=True, reason="approved", approve_count=2, reject_count=0)
        forged["missing"] = list(prop.members)
        assert not verify_consensus(forged)
        assert verify_consensus(forged, detail=True)["problem"] == "tampered"
        # Offline forgery 2: the attacker's own roster of throwaway keys, self-consistent,
        # does not pass for the real owner's room.
        evil = Identity.generate()
        fake = offline_roster_result(evil, fakes, EVAL_IN_CORE)
        assert verify_consensus(fake)  # consistent in itself...
        assert not verify_consensus(fake, trusted_owner=owner.peer_id)  # ...but not ours
        assert verify_consensus(fake, detail=True, trusted_owner=owner.peer_id)["problem"] == (
            "untrusted-owner"
        )
    finally:
        await stop_all(peers)
    assert child_processes() == []


def offline_roster_result(
    owner: Identity, voters: list[Identity], modification: dict[str, Any]
) -> dict[str, Any]:
    roster = make_roster(owner, "test", {v.peer_id: "x" for v in [owner, *voters]})
    members = [v.peer_id for v in voters]
    proposal = make_proposal(owner, modification, members, now=time.time(), roster=roster)
    tally = Tally(proposal, roster=roster)
    for v in voters:
        tally.add(cast_ballot(v, proposal, True, "ok", time.time()), now=time.time())
    return tally.result()


async def test_a_high_risk_proposal_in_an_open_room_is_refused_no_roster(
    server: SignalingServer, tmp_path: Path
) -> None:
    a, b, c = await asyncio.gather(
        *(start_peer(server.url, tmp_path / n, n, "--room", "open") for n in ("a", "b", "c"))
    )
    peers = [a, b, c]
    try:
        for p in peers:
            await wait_connected(p, 2)
        refused = (await a.call("consensus", modification=EVAL_IN_CORE))["result"]
        assert (refused["consensus"], refused["reason"]) == (False, "no-roster")
        assert refused["electorate"] == "open" and refused["ballots"] == []
        assert (await a.call("roster"))["rejections"] == {"no-roster": 1}
        # Nobody was even asked; a harmless change still passes in the open room.
        for voter in (b, c):
            assert await audit_outcomes(voter, "ballot-cast") == []
        benign = {"file_path": "analysis/clean.py", "code": "df = df.dropna()"}
        ok = (await a.call("consensus", modification=benign))["result"]
        assert (ok["consensus"], ok["reason"], ok["electorate"]) == (True, "approved", "open")
        assert verify_consensus(ok, detail=True) == {
            "valid": True,
            "electorate": "open",
            "owner": None,
            "problem": None,
        }
        assert not verify_consensus(ok, trusted_owner=pid(a))  # no roster to trust
    finally:
        await stop_all(peers)
    # Built offline with throwaway keys: an open-room high-risk approval never verifies.
    keys = [Identity.generate() for _ in range(3)]
    proposal = make_proposal(keys[0], EVAL_IN_CORE, [k.peer_id for k in keys[1:]], now=time.time())
    tally = Tally(proposal)
    for k in keys[1:]:
        tally.add(cast_ballot(k, proposal, True, "sure", time.time()), now=time.time())
    forged = tally.result()
    assert forged["consensus"] is True and forged["electorate"] == "open"
    assert verify_consensus(forged, detail=True)["problem"] == "no-roster"
    assert child_processes() == []


async def test_an_upper_case_id_peer_no_longer_makes_consensus_raise(tmp_path: Path) -> None:
    # The in-memory twin lets a peer link under any id, like a lenient server would.
    from swarm_notebook.coordinator.config import CoordinatorConfig
    from swarm_notebook.coordinator.coordinator import SwarmCoordinator
    from swarm_notebook.coordinator.events import EventBus
    from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport

    net = MemoryNetwork()
    honest = [Identity.generate() for _ in range(3)]
    shouty_key = Identity.generate()
    shouty = Identity(private_key=shouty_key.private_key, peer_id=shouty_key.peer_id.upper())
    coords = [
        SwarmCoordinator(
            i, MemoryTransport(i, net, "room"), CoordinatorConfig(), tmp_path / str(n), EventBus()
        )
        for n, i in enumerate([*honest, shouty])
    ]
    for c in coords:
        await c.start()
    try:
        a = coords[0]
        await wait_until(lambda: len(a.node.connected_peers()) == 3, 10, "links")
        assert shouty.peer_id in a.node.connected_peers()
        result = await a.consensus.request_modification_consensus(
            {"file_path": "analysis/x.py", "code": "y = 1"}
        )
        assert (result["consensus"], result["reason"]) == (True, "approved")
        assert result["ignored_members"] == [{"peer_id": shouty.peer_id, "reason": "bad-id"}]
        assert sorted(result["proposal"]["members"]) == sorted(i.peer_id for i in honest[1:])
        assert verify_consensus(result)
        assert a.rejections()["bad-id"] >= 1
    finally:
        for c in coords:
            await c.leave()


def test_rosters_only_come_from_the_trusted_owner(tmp_path: Path) -> None:
    owner, member, evil = Identity.generate(), Identity.generate(), Identity.generate()
    first = make_roster(owner, "lab", {owner.peer_id: "o", member.peer_id: "m"})
    save_roster(tmp_path, first)
    held = Electorate(member, "lab", profile_dir=tmp_path)
    assert held.trusted_owner == owner.peer_id and held.is_member(member.peer_id)
    hijack = make_roster(evil, "lab", {evil.peer_id: "me"}, version=99)
    assert held.offer(msgspec.to_builtins(hijack), evil.peer_id) == "untrusted-owner"
    assert held.offer(msgspec.to_builtins(first), owner.peer_id) is None  # same: no-op
    newer = make_roster(owner, "lab", {owner.peer_id: "o"}, version=2)
    assert held.offer(msgspec.to_builtins(newer), member.peer_id) is None  # relayed is fine
    assert held.offer(msgspec.to_builtins(first), owner.peer_id) == "stale-roster"
    assert not held.is_member(member.peer_id)
    # A profile roster from another owner than the one named is a loud error, not "open".
    with pytest.raises(RosterError) as wrong:
        Electorate(member, "lab", profile_dir=tmp_path, trusted_owner=evil.peer_id)
    assert wrong.value.reason == "untrusted-owner" and "remove it" in wrong.value.message
    # An open peer (no owner trusted) never adopts a roster from the swarm.
    open_peer = Electorate(evil, "lab")
    assert open_peer.offer(msgspec.to_builtins(first), owner.peer_id) == "untrusted-owner"
    assert held.rejections == {"untrusted-owner": 1, "stale-roster": 1}


# -- identity theft ----------------------------------------------------------------------


async def test_a_replaced_peer_keeps_retrying_and_says_so_while_others_are_served(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(
        server.url, "lab", str(tmp_path / "w0"), "--caps", "python-execution", name="w0"
    )
    c = await join("lab", signaling=server.url, profile=tmp_path / "me")
    thieves: list[PeerProcess] = []
    try:

        async def steal(profile: Path) -> PeerProcess:
            thief = await PeerProcess.start(
                "impostor.py",
                *("--signaling", server.url, "--room", "lab", "--profile", str(profile)),
                *("--mode", "thief"),
                name="thief",
            )
            thieves.append(thief)
            await thief.wait_for(lambda e: e.get("event") == "joined", 30)
            return thief

        await wait_until(lambda: c.get_stats()["connected_peers"] == 1, 30, "the worker")
        # The worker's key, copied by a thief, takes its place; the worker comes back.
        thief = await steal(tmp_path / "w0")
        await thief.wait_for(lambda e: e.get("reason") == "replaced", 30)
        await wait_until(
            lambda: any("IDENTITY CONFLICT" in line for line in worker.stderr_lines), 10, "warning"
        )
        assert server.stats()["replacements"] == 2  # thief over worker, worker over thief
        result = await c.delegate_task("python-computation", {"code": "6 * 7"})
        assert result["success"] and result["value"] == 42 and result["peer"] == worker.peer_id

        # The same for the notebook's own key: get_stats() says so, and work goes on.
        assert c.get_stats()["identity_conflicts"] == 0
        thief = await steal(tmp_path / "me")
        await thief.wait_for(lambda e: e.get("reason") == "replaced", 30)
        assert c.get_stats()["identity_conflicts"] == 1
        assert "holds this peer's key" in str(c.get_status()["message"])
        # The thief was replaced in turn: the notebook is back in the room.
        assert server.stats()["replacements"] == 4
        result = await c.delegate_task("python-computation", {"code": "1 + 1"})
        assert result["success"] and result["value"] == 2
    finally:
        await c.leave()
        await stop_all(thieves)
        assert await worker.stop() == 0
    assert child_processes() == []
