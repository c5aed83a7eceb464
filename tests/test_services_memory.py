"""Knowledge and consensus services over the in-memory transport (unit level).

Real SwarmNodes, real SQLite stores and audit logs, real signatures; only the network is
the in-memory twin. The same behaviour over real aiortc peers in separate processes is
tested in ``test_knowledge_consensus.py``.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from swarm_notebook.errors import (
    ConsensusError,
    ModificationRejected,
    ReflectionRejected,
    RemoteError,
)
from swarm_notebook.governance import (
    Modification,
    Proposal,
    cast_ballot,
    make_proposal,
    verify_consensus,
)
from swarm_notebook.governance.electorate import Electorate
from swarm_notebook.governance.service import (
    CONSENSUS_BALLOT,
    CONSENSUS_PROPOSAL,
    ConsensusConfig,
    ConsensusService,
)
from swarm_notebook.identity import Identity
from swarm_notebook.knowledge import Reflection, ReflectionStore, encode_reflection, sign_reflection
from swarm_notebook.knowledge.service import (
    KNOWLEDGE_REQUEST,
    REFLECTION_SHARE,
    KnowledgeConfig,
    KnowledgeService,
    scan_artifacts,
)
from swarm_notebook.ledger.audit import AuditLog
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.membership.roster import make_roster
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport

pytestmark = pytest.mark.timeout(60)


class Events:
    """Collects what the services notify, and lets a test wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Condition()
        self._loop = asyncio.get_running_loop()

    def __call__(self, name: str, payload: dict[str, Any]) -> None:
        self.items.append((name, payload))
        self._loop.create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [payload for event, payload in self.items if event == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 5.0) -> None:
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.named(name)) >= count)

        await asyncio.wait_for(enough(), timeout)


@dataclass
class Peer:
    node: SwarmNode
    knowledge: KnowledgeService
    consensus: ConsensusService
    store: ReflectionStore
    audit: AuditLog
    stats: CoordinationStats
    events: Events
    initialized: list[bool] = field(default_factory=lambda: [True])

    @property
    def id(self) -> str:
        return self.node.local_id

    def audited(self, operation: str) -> list[dict[str, Any]]:
        return self.audit.rows(operation, limit=1000)


class HeldVote:
    """A voter that answers only when released, as a human asked in the notebook would."""

    def __init__(self, approve: bool = True) -> None:
        self.approve = approve
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.proposal: Proposal | None = None
        self.cancelled = asyncio.Event()

    async def decide(self, proposal: Proposal, modification: Modification) -> tuple[bool, str]:
        self.proposal = proposal
        self.asked.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return self.approve, "decided by hand"


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    net = MemoryNetwork()
    made: list[Peer] = []

    async def make(
        n: int, *, room: str = "lab", consensus: ConsensusConfig | None = None
    ) -> list[Peer]:
        peers = []
        for _ in range(n):
            identity = Identity.generate()
            node = SwarmNode(identity, MemoryTransport(identity, net, room), name=f"p{len(made)}")
            node.advertise([], 1, {})  # a signed card with its name, sent as each link comes up
            folder = tmp_path / identity.peer_id[:12]
            (folder / "workspace").mkdir(parents=True)
            store = ReflectionStore(folder / "reflections.sqlite")
            audit = AuditLog(folder / "audit.sqlite")
            stats = CoordinationStats()
            events = Events()
            initialized = [True]
            knowledge = KnowledgeService(
                node=node,
                store=store,
                audit=audit,
                stats=stats,
                notify=events,
                settings=KnowledgeConfig(peer_timeout_s=0.5),
                workspace=folder / "workspace",
                is_initialized=reader(initialized),
            )
            service = ConsensusService(
                node=node,
                audit=audit,
                stats=stats,
                notify=events,
                settings=consensus or ConsensusConfig(timeout_s=5.0),
                is_initialized=reader(initialized),
            )
            await node.start()
            peer = Peer(node, knowledge, service, store, audit, stats, events, initialized)
            peers.append(peer)
            made.append(peer)
        return peers

    yield make
    for peer in made:
        await peer.knowledge.close()
        await peer.consensus.close()
        await peer.node.close()
        peer.store.close()
        peer.audit.close()


def reader(flag: list[bool]) -> Callable[[], bool]:
    return lambda: flag[0]


def lesson(description: str, outcome: str = "successful", **extra: Any) -> dict[str, Any]:
    return {"category": "pandas", "description": description, "outcome": outcome, **extra}


# --------------------------------------------------------------------------- knowledge


async def test_only_successful_reflections_are_shared_and_stored_with_provenance(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3)
    reached = await a.knowledge.share_success_pattern(
        lesson("merge(validate='one_to_one') catches duplicate keys", tags=["merge"])
    )
    assert reached == 2
    assert a.stats.patterns_shared == 1
    await b.events.wait_for("swarm:reflection-integrated")
    await c.events.wait_for("swarm:reflection-integrated")
    for receiver in (b, c):
        [row] = receiver.knowledge.reflection_records()
        assert row["source"] == "swarm" and row["shared_from"] == a.id
        assert f"shared_from_{a.id}" in row["tags"] and "merge" in row["tags"]
        assert row["author"] == a.id
        assert receiver.stats.reflections_integrated == 1
        [audit_row] = receiver.audited("reflection-integrated")
        assert audit_row["peer"] == a.id and audit_row["outcome"] == "stored"
    [shared] = a.events.named("swarm:reflection-shared")
    assert shared["count"] == 2
    # The sharer keeps its own copy, as a local reflection.
    [own] = a.knowledge.reflection_records()
    assert own["source"] == "local" and own["shared_from"] is None

    # A failed lesson is kept locally but reaches nobody.
    assert await a.knowledge.share_success_pattern(lesson("apply() was slow", "failed")) == 0
    assert a.stats.patterns_shared == 1
    assert a.store.count() == 2
    assert [r["outcome"] for r in a.audited("reflection-shared")] == [
        "skipped:not-successful",
        "sent",
    ]
    # Not initialised: nothing is sent either.
    a.initialized[0] = False
    assert await a.knowledge.share_success_pattern(lesson("vectorise with numpy")) == 0
    a.initialized[0] = True
    # Ordered links: once a later share arrived, the skipped ones provably never did.
    assert await a.knowledge.share_success_pattern(lesson("use categoricals")) == 2
    await b.events.wait_for("swarm:reflection-integrated", count=2)
    assert sorted(r["description"] for r in b.knowledge.reflection_records()) == [
        "merge(validate='one_to_one') catches duplicate keys",
        "use categoricals",
    ]


async def test_bad_reflections_are_refused_with_reasons_counted_and_audited(
    swarm: Callable[..., Any],
) -> None:
    a, b = await swarm(2)
    good = sign_reflection(a.node.identity, **lesson("read_parquet with columns=[...]"))

    async def push(sender: Peer, reflection: bytes) -> str:
        # Sent as a request so the refusal comes back to us with its reason.
        try:
            await sender.node.endpoint.request(
                b.id, REFLECTION_SHARE, {"reflection": reflection}, timeout=2
            )
        except RemoteError as exc:
            return exc.reason
        return "accepted"

    assert await push(a, encode_reflection(good)) == "accepted"
    assert await push(a, encode_reflection(good)) == "replayed"
    forged = msgspec.structs.replace(good, description="read_csv is always fine")
    assert await push(a, encode_reflection(forged)) == "bad-signature"
    huge = Reflection(
        "pandas",
        "x" * 20_000,
        "successful",
        author=a.id,
        timestamp=time.time(),
        signature="0" * 128,
    )
    assert await push(a, encode_reflection(huge)) == "oversized"
    failed = sign_reflection(a.node.identity, **lesson("loops", "failed"))
    assert await push(a, encode_reflection(failed)) == "not-successful"
    # A third peer relays a's reflection: signed, but the sender is not its author.
    relayed = sign_reflection(a.node.identity, **lesson("relayed lesson"))
    (relay,) = await swarm(1)
    assert await push(relay, encode_reflection(relayed)) == "author-mismatch"
    assert b.store.count() == 1
    reasons = [row["outcome"] for row in reversed(b.audited("reflection-rejected"))]
    assert reasons == [
        "replayed",
        "bad-signature",
        "oversized",
        "not-successful",
        "author-mismatch",
    ]
    assert b.knowledge.gate.rejections == {
        "replayed": 1,
        "bad-signature": 1,
        "oversized": 1,
        "not-successful": 1,
        "author-mismatch": 1,
    }
    assert b.stats.messages_rejected == 5
    # A body of the wrong shape never reaches the gate: the endpoint refuses it.
    with pytest.raises(RemoteError) as err:
        await a.node.endpoint.request(b.id, REFLECTION_SHARE, {"reflection": {"x": 1}})
    assert err.value.reason == "wrong-schema"
    # Malformed input from the local user is a clear error too.
    with pytest.raises(ReflectionRejected) as bad:
        await a.knowledge.share_success_pattern({"description": "no outcome"})
    assert bad.value.reason == "wrong-schema"
    with pytest.raises(ReflectionRejected) as reserved:
        await a.knowledge.share_success_pattern(lesson("x", tags=[f"shared_from_{b.id}"]))
    assert reserved.value.reason == "reserved-tag"


async def test_a_flood_is_rate_limited_and_audited_within_bounds(
    swarm: Callable[..., Any],
) -> None:
    a, b = await swarm(2)
    outcomes = []
    for i in range(40):
        r = sign_reflection(a.node.identity, **lesson(f"lesson number {i}"))
        try:
            await a.node.endpoint.request(
                b.id, REFLECTION_SHARE, {"reflection": encode_reflection(r)}, timeout=2
            )
            outcomes.append("accepted")
        except RemoteError as exc:
            outcomes.append(exc.reason)
    assert outcomes[:10] == ["accepted"] * 10  # the burst
    assert outcomes.count("rate-limited") >= 25
    assert b.store.count() == outcomes.count("accepted")
    # Every refusal is counted; the audit log takes at most its own burst of them.
    assert b.knowledge.gate.rejections["rate-limited"] == outcomes.count("rate-limited")
    audited = len(b.audited("reflection-rejected"))
    assert audited <= 21
    assert audited + b.knowledge.rejections_not_audited == outcomes.count("rate-limited")


async def test_query_merges_peers_attributed_with_artifacts_and_partial_on_timeout(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3)
    await b.knowledge.add_reflection(lesson("pandas merge: validate one_to_one"))
    await c.knowledge.add_reflection(lesson("pandas groupby with observed=True"))
    await a.knowledge.add_reflection(lesson("polars is not pandas", tags=["polars"]))
    await b.knowledge.add_reflection(lesson("pandas iterrows on 1e6 rows", "failed"))
    assert b.knowledge.workspace is not None and a.knowledge.workspace is not None
    (b.knowledge.workspace / "pandas_tips.md").write_text("secret contents")
    (a.knowledge.workspace / "sub").mkdir()
    (a.knowledge.workspace / "sub" / "pandas_profile.parquet").write_bytes(b"PAR1")
    found = await a.knowledge.query_knowledge("pandas")
    assert found["peers"] == {b.id: "answered", c.id: "answered"}
    by_text = {r["description"]: r for r in found["reflections"]}
    assert by_text["pandas merge: validate one_to_one"]["from_peer"] == [b.id]
    assert by_text["pandas groupby with observed=True"]["from_peer"] == [c.id]
    assert by_text["polars is not pandas"]["from_peer"] == ["local"]
    # Attributed by name too (from the signed cards), not only by 52-character keys.
    assert by_text["pandas merge: validate one_to_one"]["from_peer_name"] == [b.node.name]
    assert by_text["polars is not pandas"]["from_peer_name"] == [a.node.name]
    # Peers answer with successful lessons only; a failed one stays a local note.
    assert "pandas iterrows on 1e6 rows" not in by_text
    own = await b.knowledge.query_knowledge("iterrows")
    assert [r["description"] for r in own["reflections"]] == ["pandas iterrows on 1e6 rows"]
    assert all(r["verified"] for r in found["reflections"])
    assert {(x["from_peer"], x["path"], x["type"]) for x in found["artifacts"]} == {
        ("local", "sub/pandas_profile.parquet", "parquet"),
        (b.id, "pandas_tips.md", "md"),
    }
    assert "secret contents" not in repr(found)
    assert a.stats.knowledge_queries == 1
    [row] = a.audited("knowledge-query")
    assert row["outcome"] == "ok" and row["detail"]["reflections"] == 3

    # c stops answering (a stand-in for a frozen peer; the real freeze is in the
    # multi-process test): b's answers still arrive, after c's timeout only.
    never = asyncio.Event()

    async def frozen(peer: str, body: Any) -> Any:
        await never.wait()

    c.node.endpoint.register_message_handler(KNOWLEDGE_REQUEST, frozen)
    started = time.monotonic()
    partial = await a.knowledge.query_knowledge("pandas", timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0
    assert partial["peers"] == {b.id: "answered", c.id: "timeout"}
    assert {r["description"] for r in partial["reflections"]} == {
        "pandas merge: validate one_to_one",
        "polars is not pandas",
    }
    assert a.audited("knowledge-query")[0]["outcome"] == "partial"

    # A peer answering garbage: its bad items are reported, the rest kept.
    def garbage(peer: str, body: Any) -> Any:
        return {"reflections": [{"description": 42}, "nonsense"], "artifacts": []}

    c.node.endpoint.register_message_handler(KNOWLEDGE_REQUEST, garbage)
    mixed = await a.knowledge.query_knowledge("pandas")
    assert mixed["peers"][c.id] == "answered"
    assert [(r["from_peer"], r["reason"]) for r in mixed["rejected"]] == [
        (c.id, "wrong-schema"),
        (c.id, "wrong-schema"),
    ]
    c.node.endpoint.register_message_handler(KNOWLEDGE_REQUEST, lambda p, b: ["not", "a", "dict"])
    wrong = await a.knowledge.query_knowledge("pandas")
    assert wrong["peers"][c.id].startswith("error: wrong-schema")


async def test_knowledge_requests_are_bounded_and_rate_limited(swarm: Callable[..., Any]) -> None:
    a, b = await swarm(2)
    for i in range(60):
        b.store.add_reflection(Reflection("pandas", f"pandas trick {i}", "successful"))
    answer = await a.node.endpoint.request(b.id, KNOWLEDGE_REQUEST, {"query": "pandas"})
    assert len(answer["reflections"]) == 10
    with pytest.raises(RemoteError) as err:
        await a.node.endpoint.request(b.id, KNOWLEDGE_REQUEST, {"query": "pandas", "limit": 500})
    assert err.value.reason == "wrong-schema"
    found = await a.knowledge.query_knowledge("pandas", limit=500)
    assert len(found["reflections"]) == 50
    reasons = []
    for _ in range(30):
        try:
            await a.node.endpoint.request(b.id, KNOWLEDGE_REQUEST, {"query": "x", "limit": 1})
            reasons.append("ok")
        except RemoteError as exc:
            reasons.append(exc.reason)
    assert "rate-limited" in reasons
    assert b.knowledge.request_rejections["rate-limited"] == reasons.count("rate-limited")
    limited = await a.knowledge.query_knowledge("pandas")
    assert limited["peers"] == {b.id: "error: rate-limited"}


def test_artifact_scan_is_bounded_skips_hidden_and_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "sales_secret").touch()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sales_2024.csv").touch()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "sales_outside.csv").touch()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "data").symlink_to(tmp_path / "data")
    (workspace / "link_sales.csv").symlink_to(tmp_path / "outside" / "sales_outside.csv")
    (workspace / "sales_q1.parquet").touch()
    deep = workspace
    for level in range(10):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    (deep / "sales_deep.csv").touch()
    assert scan_artifacts(workspace, "sales", 10) == [
        {"path": "sales_q1.parquet", "type": "parquet"}
    ]
    assert scan_artifacts(workspace, "", 10) == []


# --------------------------------------------------------------------------- consensus


async def test_fallback_only_when_the_swarm_is_unavailable(swarm: Callable[..., Any]) -> None:
    (alone,) = await swarm(1, room="solo")
    result = await alone.consensus.request_modification_consensus(
        {"file_path": "notes.py", "code": "x = 1"}
    )
    assert (result["consensus"], result["reason"]) == (True, "swarm-not-available")
    assert not verify_consensus(result)
    alone.consensus.settings.fail_closed = True
    closed = await alone.consensus.request_modification_consensus({"file_path": "notes.py"})
    assert (closed["consensus"], closed["reason"]) == (False, "swarm-not-available")
    a, _b = await swarm(2)
    a.initialized[0] = False
    uninitialised = await a.consensus.request_modification_consensus({"file_path": "n.py"})
    assert (uninitialised["consensus"], uninitialised["reason"]) == (True, "swarm-not-available")
    assert alone.stats.consensus_requests == 2
    assert [r["outcome"] for r in alone.audited("consensus-result")] == [
        "swarm-not-available",
        "swarm-not-available",
    ]
    assert [r["consensus"] for r in alone.consensus.consensus_records()] == [True, False]
    assert alone.events.named("swarm:consensus-result")[0]["reason"] == "swarm-not-available"


async def test_peers_approve_and_the_result_verifies_but_not_when_tampered(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3)
    result = await a.consensus.request_modification_consensus(
        {"file_path": "analysis/clean.py", "code": "df = df.dropna()", "reason": "drop empties"}
    )
    assert (result["consensus"], result["reason"]) == (True, "approved")
    # The proposer does not vote: members are the connected peers.
    assert sorted(result["proposal"]["members"]) == sorted([b.id, c.id])
    assert verify_consensus(result)
    tampered = copy.deepcopy(result)
    tampered["votes"][b.id]["approve"] = False
    assert not verify_consensus(tampered)
    flipped = copy.deepcopy(result)
    flipped["ballots"][0]["approve"] = not flipped["ballots"][0]["approve"]
    assert not verify_consensus(flipped)
    dropped = copy.deepcopy(result)
    dropped["ballots"].pop()
    assert not verify_consensus(dropped)
    assert a.consensus.latest() is not None and a.consensus.latest()["consensus"] is True
    [row] = a.consensus.consensus_records()
    assert row["risk"] == "medium" and row["approve_count"] == 2 and row["missing"] == []
    assert len(a.audited("proposal-created")) == 1
    assert {r["outcome"] for r in a.audited("ballot-received")} == {"counted"}
    assert a.audited("consensus-result")[0]["outcome"] == "approved"
    for voter in (b, c):
        [cast] = voter.audited("ballot-cast")
        assert cast["peer"] == a.id and cast["outcome"] == "approve"


def put_on_roster(peers: list[Peer], room: str = "lab") -> None:
    """A roster owned by the first peer with every peer on it (high risk needs one)."""
    owner = peers[0].node.identity
    roster = make_roster(owner, room, {p.id: f"peer-{i}" for i, p in enumerate(peers)})
    for p in peers:
        p.consensus.electorate = Electorate(p.node.identity, room, roster=roster)


async def test_eval_in_a_core_file_is_refused_by_the_default_policy(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3)
    put_on_roster([a, b, c])
    mod = {
        "file_path": "src/pkg/__init__.py",
        "code": "result = eval(user_input)",
        "reason": "a very convincing rationale",
    }
    assert a.consensus.assess_modification_risk(mod) == "high"
    result = await a.consensus.request_modification_consensus(mod)
    assert (result["consensus"], result["reason"]) == (False, "rejected")
    assert {v["reason"] for v in result["votes"].values()} == {
        "refused: the code calls eval()/exec() or the like (line 1: refers to eval)"
    }
    assert verify_consensus(result, detail=True)["electorate"] == "roster"
    assert result["proposal"]["risk"] == "high"
    for voter in (b, c):
        assert voter.audited("ballot-cast")[0]["outcome"] == "reject"


async def test_forged_duplicate_and_non_member_ballots_are_ignored_and_reported(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3)
    held_b, held_c = HeldVote(), HeldVote()
    b.consensus.vote_policy = held_b
    c.consensus.vote_policy = held_c
    asking = asyncio.create_task(
        a.consensus.request_modification_consensus({"file_path": "x.py", "code": "y = 2"})
    )
    await asyncio.wait_for(held_c.asked.wait(), 5)
    proposal = held_c.proposal
    assert proposal is not None

    async def inject(ballot: Any) -> None:
        body = {"ballot": msgspec.to_builtins(ballot)}
        await c.node.endpoint.request(a.id, CONSENSUS_BALLOT, body, timeout=2)

    real = cast_ballot(c.node.identity, proposal, True, "sent on its own", time.time())
    await inject(msgspec.structs.replace(real, approve=False))  # signature no longer matches
    outsider = Identity.generate()
    await inject(cast_ballot(outsider, proposal, True, "let me in", time.time()))
    await inject(real)
    await inject(real)
    assert not asking.done()  # one valid ballot of two needed
    held_b.release.set()
    result = await asyncio.wait_for(asking, 5)
    assert (result["consensus"], result["reason"]) == (True, "approved")
    assert sorted(result["votes"]) == sorted([b.id, c.id])
    assert result["ignored_counts"] == {"forged": 1, "non-member": 1, "duplicate": 1}
    assert {(i["voter"], i["reason"]) for i in result["ignored"]} == {
        (c.id, "forged"),
        (outsider.peer_id, "non-member"),
        (c.id, "duplicate"),
    }
    assert verify_consensus(result)
    # c's own policy was still thinking when the outcome was fixed: it was cancelled.
    await asyncio.wait_for(held_c.cancelled.wait(), 2)
    outcomes = sorted(r["outcome"] for r in a.audited("ballot-received"))
    assert outcomes == [
        "counted",
        "counted",
        "ignored:duplicate",
        "ignored:forged",
        "ignored:non-member",
    ]
    # A ballot for a proposal that is no longer open is refused, not counted.
    with pytest.raises(RemoteError) as err:
        await c.node.endpoint.request(
            a.id, CONSENSUS_BALLOT, {"ballot": msgspec.to_builtins(real)}, timeout=2
        )
    assert err.value.reason == "unknown-proposal"


async def test_timeout_gives_consensus_false_with_reason_timeout(
    swarm: Callable[..., Any],
) -> None:
    a, b, c = await swarm(3, consensus=ConsensusConfig(timeout_s=0.4))
    b.consensus.vote_policy = HeldVote()
    c.consensus.vote_policy = HeldVote()
    started = time.monotonic()
    result = await a.consensus.request_modification_consensus({"file_path": "x.py", "code": "1"})
    assert 0.35 <= time.monotonic() - started < 3.0
    assert (result["consensus"], result["reason"]) == (False, "timeout")
    assert sorted(result["missing"]) == sorted([b.id, c.id])
    assert result["member_errors"] == {b.id: "timeout", c.id: "timeout"}
    assert verify_consensus(result)
    assert a.audited("consensus-result")[0]["outcome"] == "timeout"


async def test_quorum_rules_and_no_quorum_when_members_refuse(swarm: Callable[..., Any]) -> None:
    a, b, c = await swarm(3, consensus=ConsensusConfig(quorum="unanimous"))
    c.consensus.vote_policy = HeldVote(approve=False)
    c.consensus.vote_policy.release.set()
    result = await a.consensus.request_modification_consensus({"file_path": "x.py", "code": "1"})
    assert (result["consensus"], result["reason"]) == (False, "rejected")
    assert result["quorum"]["rule"] == "unanimous"
    a.consensus.settings.quorum = "threshold:5"
    unreachable = await a.consensus.request_modification_consensus({"file_path": "x.py"})
    assert (unreachable["consensus"], unreachable["reason"]) == (False, "quorum-unreachable")
    # Every member answered, with refusals only: no need to wait for the deadline.
    a.consensus.settings.quorum = "majority"
    b.initialized[0] = False
    c.initialized[0] = False
    started = time.monotonic()
    refused = await a.consensus.request_modification_consensus({"file_path": "x.py"})
    assert time.monotonic() - started < 2.0
    assert (refused["consensus"], refused["reason"]) == (False, "no-quorum")
    assert refused["member_errors"] == {b.id: "not-initialized", c.id: "not-initialized"}
    with pytest.raises(ModificationRejected):
        await a.consensus.request_modification_consensus({"code": "no file path"})


async def test_voters_check_proposals_before_any_policy_runs(swarm: Callable[..., Any]) -> None:
    a, b, c = await swarm(3)
    mod = {"file_path": "x.py", "code": "y = 1"}
    modification = {"file_path": "x.py", "code": "y = 1", "operation": "MODIFY", "reason": ""}

    async def ask(sender: Peer, proposal: Proposal, body_mod: Any = modification) -> Any:
        body = {"proposal": msgspec.to_builtins(proposal), "modification": body_mod}
        return await sender.node.endpoint.request(b.id, CONSENSUS_PROPOSAL, body, timeout=2)

    # c relays a proposal a signed: b only takes a proposal from its proposer.
    by_a = make_proposal(a.node.identity, mod, [b.id, c.id], now=time.time())
    with pytest.raises(RemoteError) as err:
        await ask(c, by_a)
    assert err.value.reason == "proposer-mismatch"
    # b is not a member of this one.
    excluding_b = make_proposal(a.node.identity, mod, [c.id], now=time.time())
    with pytest.raises(RemoteError) as err:
        await ask(a, excluding_b)
    assert err.value.reason == "non-member"
    tampered = msgspec.structs.replace(by_a, target="other.py")
    with pytest.raises(RemoteError) as err:
        await ask(a, tampered)
    assert err.value.reason == "bad-signature"
    # The code sent is not the code proposed: a signed rejection, no policy asked.
    mismatch = await ask(a, by_a, {**modification, "code": "import os; os.remove('x')"})
    assert mismatch["approve"] is False and mismatch["reason"] == "content-mismatch"
    # Asked again, b answers with the same ballot (one ballot per member).
    assert await ask(a, by_a) == mismatch
    assert [r["outcome"] for r in reversed(b.audited("ballot-cast"))] == [
        "refused:non-member",
        "refused:bad-signature",
        "reject",
    ]
    assert b.consensus.rejections["proposer-mismatch"] == 1

    # A proposer that asks anyway: an open-room high-risk proposal gets no ballot (no-roster),
    # and once b holds a roster, a proposal that does not bind it gets roster-mismatch.
    risky = {"file_path": "x.py", "code": "eval(y)", "operation": "MODIFY", "reason": "why not"}
    open_risky = make_proposal(a.node.identity, risky, [b.id, c.id], now=time.time())
    with pytest.raises(RemoteError) as err:
        await ask(a, open_risky, risky)
    assert err.value.reason == "no-roster"
    put_on_roster([a, b, c])
    with pytest.raises(RemoteError) as err:
        await ask(a, make_proposal(a.node.identity, mod, [b.id, c.id], now=time.time()))
    assert err.value.reason == "roster-mismatch"
    assert b.consensus.rejections["no-roster"] == b.consensus.rejections["roster-mismatch"] == 1


async def test_closing_ends_an_open_proposal_and_refuses_new_ones(
    swarm: Callable[..., Any],
) -> None:
    a, b = await swarm(2)
    held = HeldVote()
    b.consensus.vote_policy = held
    asking = asyncio.create_task(a.consensus.request_modification_consensus({"file_path": "x.py"}))
    await asyncio.wait_for(held.asked.wait(), 5)
    await a.consensus.close()
    result = await asyncio.wait_for(asking, 5)
    assert (result["consensus"], result["reason"]) == (False, "closed")
    with pytest.raises(ConsensusError) as err:
        await a.consensus.request_modification_consensus({"file_path": "x.py"})
    assert err.value.reason == "closed"
