"""Signed proposals and ballots, the tally, verify_consensus, risk rules, vote policy."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from swarm_notebook.errors import ConsensusError, ModificationRejected
from swarm_notebook.governance import (
    Ballot,
    DefaultVotePolicy,
    Modification,
    Proposal,
    StrictMajority,
    Tally,
    Threshold,
    Unanimous,
    assess_modification_risk,
    cast_ballot,
    make_proposal,
    modification_matches,
    proposal_hash,
    respond_to_proposal,
    unavailable_result,
    verify_ballot,
    verify_consensus,
    verify_proposal,
)
from swarm_notebook.identity import Identity

NOW = 1_700_000_000.0
MOD = {"file_path": "analysis/clean.py", "code": "df = df.dropna()", "reason": "tidy"}


@pytest.fixture(scope="module")
def peers() -> list[Identity]:
    return [Identity.generate() for _ in range(5)]


@pytest.fixture(scope="module")
def proposal(peers: list[Identity]) -> Proposal:
    return make_proposal(peers[0], MOD, [p.peer_id for p in peers], now=NOW, timeout_s=30)


def vote(who: Identity, proposal: Proposal, approve: bool, at: float = NOW + 1) -> Ballot:
    return cast_ballot(who, proposal, approve, "yes" if approve else "no", now=at)


# --------------------------------------------------------------------------- proposals


def test_proposal_is_signed_and_bound(peers: list[Identity], proposal: Proposal) -> None:
    assert verify_proposal(proposal)
    assert proposal.members == tuple(sorted(p.peer_id for p in peers))
    assert proposal.risk == "medium" and proposal.deadline == NOW + 30
    assert proposal.quorum == "strict-majority"
    assert modification_matches(proposal, MOD)
    assert not modification_matches(proposal, {**MOD, "code": "df = df"})
    outsider = Identity.generate().peer_id
    tampered = msgspec.structs.replace(proposal, members=(*proposal.members, outsider))
    assert not verify_proposal(tampered)
    assert not verify_proposal(msgspec.structs.replace(proposal, deadline=NOW + 999))
    assert proposal_hash(tampered) != proposal_hash(proposal)


def test_make_proposal_refuses_unusable_input(peers: list[Identity]) -> None:
    me = peers[0]
    with pytest.raises(ConsensusError) as exc:
        make_proposal(me, MOD, [], now=NOW)
    assert exc.value.reason == "no-members"
    with pytest.raises(ConsensusError) as exc:
        make_proposal(me, MOD, ["not-a-peer-id"], now=NOW)
    assert exc.value.reason == "wrong-schema"
    with pytest.raises(ConsensusError) as exc:
        make_proposal(me, MOD, [me.peer_id], now=NOW, quorum=Threshold(2))
    assert exc.value.reason == "bad-quorum"
    with pytest.raises(ModificationRejected) as mexc:
        make_proposal(me, {"file_path": "x.py", "operation": "RENAME"}, [me.peer_id], now=NOW)
    assert mexc.value.reason == "wrong-schema"


# ------------------------------------------------------------------------------ tally


def test_majority_approves_early(peers: list[Identity], proposal: Proposal) -> None:
    tally = Tally(proposal)
    assert tally.add(vote(peers[0], proposal, True), NOW + 1)
    assert tally.add(vote(peers[1], proposal, False), NOW + 1)
    assert tally.add(vote(peers[2], proposal, True), NOW + 1)
    assert not tally.decided
    assert tally.add(vote(peers[3], proposal, True), NOW + 2)
    assert tally.decided  # 3 of 5: the last vote can no longer change it
    result = tally.result(now=NOW + 2)
    assert result["consensus"] is True and result["reason"] == "approved"
    assert result["approve_count"] == 3 and result["reject_count"] == 1
    assert result["missing"] == [peers[4].peer_id]
    assert result["votes"][peers[1].peer_id] == {"approve": False, "reason": "no"}
    assert result["quorum"] == {"rule": "strict-majority", "members": 5, "needed": 3}
    assert verify_consensus(result)


def test_majority_rejects_early(peers: list[Identity], proposal: Proposal) -> None:
    tally = Tally(proposal)
    for who in peers[:3]:
        tally.add(vote(who, proposal, False), NOW + 1)
    result = tally.result()
    assert result["consensus"] is False and result["reason"] == "rejected"
    assert verify_consensus(result)


def test_bad_ballots_are_ignored_and_reported(peers: list[Identity], proposal: Proposal) -> None:
    outsider = Identity.generate()
    other = make_proposal(peers[0], MOD, [p.peer_id for p in peers], now=NOW)
    tally = Tally(proposal)

    # forged: signed by a non-member key while claiming a member's id
    forged = msgspec.structs.replace(vote(outsider, proposal, True), voter=peers[1].peer_id)
    # tampered: a real ballot whose approve flag was flipped in transit
    tampered = msgspec.structs.replace(vote(peers[2], proposal, False), approve=True)
    assert not tally.add(forged, NOW + 1)
    assert not tally.add(tampered, NOW + 1)
    assert not tally.add(vote(outsider, proposal, True), NOW + 1)  # non-member
    assert not tally.add(vote(peers[3], other, True), NOW + 1)  # ballot for another proposal
    wrong_hash = cast_ballot(
        peers[3], msgspec.structs.replace(proposal, rationale="x"), True, "", NOW + 1
    )
    assert not tally.add(wrong_hash, NOW + 1)
    assert not tally.add(vote(peers[4], proposal, True, at=NOW + 31), NOW + 31)  # late
    assert not tally.add(vote(peers[4], proposal, True), NOW + 31)  # received late
    assert not tally.add({"voter": "x", "approve": "maybe"}, NOW + 1)

    assert tally.add(vote(peers[1], proposal, False), NOW + 2)  # the real peer 1 still counts
    assert not tally.add(vote(peers[1], proposal, True), NOW + 3)  # duplicate: first counts

    result = tally.result(now=NOW + 40)
    assert result["votes"] == {peers[1].peer_id: {"approve": False, "reason": "no"}}
    assert [(i["voter"], i["reason"]) for i in result["ignored"]] == [
        (peers[1].peer_id, "forged"),
        (peers[2].peer_id, "forged"),
        (outsider.peer_id, "non-member"),
        (peers[3].peer_id, "wrong-proposal"),
        (peers[3].peer_id, "wrong-proposal"),
        (peers[4].peer_id, "late"),
        (peers[4].peer_id, "late"),
        ("x", "wrong-schema"),
        (peers[1].peer_id, "duplicate"),
    ]
    assert result["ignored_counts"] == {
        "forged": 2,
        "non-member": 1,
        "wrong-proposal": 2,
        "late": 2,
        "wrong-schema": 1,
        "duplicate": 1,
    }
    assert result["consensus"] is False and result["reason"] == "timeout"
    assert verify_consensus(result)


def test_timeout_pending_and_explicit_reason(peers: list[Identity], proposal: Proposal) -> None:
    tally = Tally(proposal)
    tally.add(vote(peers[0], proposal, True), NOW + 1)
    assert tally.result(now=NOW + 10)["reason"] == "pending"
    timed_out = tally.result(now=NOW + 30.5)
    assert timed_out["consensus"] is False and timed_out["reason"] == "timeout"
    assert timed_out["missing"] == sorted(p.peer_id for p in peers[1:])
    assert tally.result(reason="cancelled")["reason"] == "cancelled"


def test_quorum_rules(peers: list[Identity]) -> None:
    members = [p.peer_id for p in peers]
    unanimous = make_proposal(peers[0], MOD, members, now=NOW, quorum=Unanimous())
    tally = Tally(unanimous)
    for who in peers[:4]:
        tally.add(vote(who, unanimous, True), NOW + 1)
    assert not tally.decided
    tally.add(vote(peers[4], unanimous, False), NOW + 1)
    assert tally.result()["reason"] == "rejected"
    assert verify_consensus(tally.result())

    two = make_proposal(peers[0], MOD, members, now=NOW, quorum=Threshold(2))
    tally = Tally(two, Threshold(2))
    tally.add(vote(peers[3], two, True), NOW + 1)
    tally.add(vote(peers[4], two, True), NOW + 1)
    assert tally.result()["consensus"] is True
    assert verify_consensus(tally.result())
    # the rule is signed into the proposal: a tally cannot be run under another one
    with pytest.raises(ConsensusError) as exc:
        Tally(two, StrictMajority())
    assert exc.value.reason == "quorum-mismatch"


def test_verify_consensus_rejects_tampering(peers: list[Identity], proposal: Proposal) -> None:
    tally = Tally(proposal)
    for who, approve in zip(peers, [True, True, False, True], strict=False):
        tally.add(vote(who, proposal, approve), NOW + 1)
    real = tally.result()
    assert real["consensus"] is True and verify_consensus(real)
    voter = peers[2].peer_id

    def tampered(change: Any) -> dict[str, Any]:
        result = copy.deepcopy(real)
        change(result)
        return result

    def flip_vote(r: dict[str, Any]) -> None:
        r["votes"][voter]["approve"] = True
        r["ballots"][2]["approve"] = True
        r["approve_count"], r["reject_count"] = 4, 0

    def add_member(r: dict[str, Any]) -> None:
        r["proposal"]["members"] = sorted([*r["proposal"]["members"], Identity.generate().peer_id])

    def duplicate_ballot(r: dict[str, Any]) -> None:
        r["ballots"].append(r["ballots"][0])

    def consistent_duplicate(r: dict[str, Any]) -> None:
        # counts adjusted to match: only the one-ballot-per-voter rule catches it
        r["ballots"].append(r["ballots"][0])
        r["approve_count"] += 1

    def drop_ballot(r: dict[str, Any]) -> None:
        del r["ballots"][0]

    for change in (
        lambda r: r.update(consensus=False),
        lambda r: r.update(reason="rejected"),
        lambda r: r["votes"][voter].update(approve=True),
        flip_vote,
        lambda r: r["ballots"][0].update(signature=""),
        add_member,
        duplicate_ballot,
        consistent_duplicate,
        drop_ballot,
        lambda r: r["proposal"].update(quorum="threshold:1"),
        lambda r: r.update(approve_count=5),
        lambda r: r.update(missing=[]),
        lambda r: r.update(proposal=None),
        lambda r: r.pop("ballots"),
    ):
        assert not verify_consensus(tampered(change))
    assert not verify_consensus(unavailable_result())


def test_unavailable_result_both_ways() -> None:
    open_result = unavailable_result()
    assert open_result["consensus"] is True
    assert open_result["reason"] == "swarm-not-available"
    closed = unavailable_result(fail_closed=True)
    assert closed["consensus"] is False and closed["reason"] == "swarm-not-available"


def test_verify_ballot(peers: list[Identity], proposal: Proposal) -> None:
    ballot = vote(peers[1], proposal, True)
    assert verify_ballot(ballot, proposal)
    assert not verify_ballot(msgspec.structs.replace(ballot, reason="changed"), proposal)
    assert not verify_ballot(vote(Identity.generate(), proposal, True), proposal)


# ------------------------------------------------------------------------------- risk


@pytest.mark.parametrize(
    ("modification", "risk"),
    [
        ({"file_path": "pyproject.toml", "code": "x"}, "high"),
        ({"file_path": "requirements-dev.txt", "code": "numpy"}, "high"),
        ({"file_path": "services/api/requirements.txt", "code": "numpy"}, "high"),
        ({"file_path": "setup.py", "code": "x = 1"}, "high"),
        ({"file_path": "env/environment.yml", "code": "x"}, "high"),
        ({"file_path": "Pipfile.lock", "code": "{}"}, "high"),
        ({"file_path": "uv.lock", "code": "x"}, "high"),
        ({"file_path": ".github/workflows/ci.yml", "code": "on: push"}, "high"),
        ({"file_path": ".gitlab-ci.yml", "code": "x"}, "high"),
        ({"file_path": "src/pkg/__init__.py", "code": "x = 1"}, "high"),
        ({"file_path": "pkg/__main__.py", "code": "x = 1"}, "high"),
        ({"file_path": "tests/conftest.py", "code": "x = 1"}, "high"),
        ({"file_path": "/etc/cron.d/job", "code": "x = 1"}, "high"),
        ({"file_path": "analysis/../../home/x.py", "code": "x = 1"}, "high"),
        ({"file_path": "upgrades/agent-cycle.js", "code": "x"}, "medium"),  # not a data repo's
        ({"file_path": "github/workflows.py", "code": "x = 1"}, "medium"),
        ({"file_path": "analysis/run.py", "code": "def broken(:"}, "high"),
        ({"file_path": "analysis/old.py", "operation": "DELETE"}, "high"),
        ({"file_path": "analysis/run.py", "code": "eval(user_input)"}, "high"),
        ({"file_path": "analysis/run.py", "code": "exec (src)"}, "high"),
        ({"file_path": "my_pyproject.toml.py", "code": "x = 1"}, "medium"),
        ({"file_path": "analysis/train.py", "code": "model.eval()"}, "medium"),
        ({"file_path": "analysis/run.py", "code": "evaluate(x)"}, "medium"),
        ({"file_path": "analysis/run.py", "code": "df.groupby('a').sum()"}, "medium"),
        ({"file_path": "README.md", "code": "# Title"}, "low"),
        ({"file_path": "docs/guide.py", "code": "x = 1"}, "low"),
        ({"file_path": "notebooks/explore.ipynb", "code": "{}"}, "low"),
        ({"file_path": "analysis/run.py", "code": "   "}, "low"),
    ],
)
def test_risk_rules(modification: dict[str, Any], risk: str) -> None:
    assert assess_modification_risk(modification) == risk


@pytest.mark.parametrize(
    "code",
    [
        # Finding 6: each passed the old ``\\b(eval|exec)\\s*\\(`` regex.
        "(eval)(p)",
        "getattr(__builtins__, 'ev' + 'al')(p)",
        "eval #\n(p)",
        "__import__('builtins').__dict__['exec'](p)",
        # aliasing
        "e = eval\ne(p)",
        "from builtins import exec as x\nx(p)",
        "import builtins as b\nb.exec(p)",
        "g = getattr\ng(obj, name)(p)",
        "run = [exec][0]\nrun(p)",
        # the rest of the list
        "compile(src, 'f', 'exec')",
        "import importlib\nimportlib.import_module(name)",
        "from importlib import import_module",
        "setattr(obj, name, value)",
        "delattr(obj, name)",
        "getattr(obj, 'system')('ls')",
        "globals()['x'] = 1",
        "vars(module)['f']()",
        "locals()",
        "type(x).__subclasses__()",
        "f.__globals__['os']",
        "import subprocess\nsubprocess.run(['ls'])",
        "import os\nos.system('ls')",
        "import os as o\no.execv('/bin/sh', [])",
        "from os import spawnl",
        "from os import popen as run\nrun('ls')",
        "import ctypes",
        "import pickle\npickle.loads(blob)",
        "from pickle import loads",
        "import sys\nsys.modules['os'].system('x')",
        "def f(:",  # does not parse
    ],
)
def test_dynamic_code_on_the_syntax_tree_is_high_risk(code: str) -> None:
    mod = {"file_path": "analysis/run.py", "code": code}
    assert assess_modification_risk(mod) == "high", code
    me = Identity.generate()
    proposal = make_proposal(me, mod, [me.peer_id], now=NOW)
    approve, why = DefaultVotePolicy().decide(proposal, Modification(**mod))
    assert not approve and why.startswith("refused: the code calls eval()/exec()"), why


@pytest.mark.parametrize(
    "code",
    [
        "getattr(obj, 'name', None)",
        "setattr(cfg, 'debug', True)",
        "import os\nos.path.join(a, b)\nos.environ.get('X')",
        "import pandas as pd\npd.read_csv('x.csv').groupby('a').sum()",
        "model.eval()",
        "class A(B):\n    def __init__(self):\n        super().__init__()",
        "import pickle\npickle.dumps(x)",
    ],
)
def test_ordinary_data_code_stays_medium(code: str) -> None:
    assert assess_modification_risk({"file_path": "analysis/run.py", "code": code}) == "medium"


def test_notebook_cells_are_read_as_python() -> None:
    def nb(*cells: str) -> str:
        return msgspec.json.encode(
            {"cells": [{"cell_type": "code", "source": c} for c in cells]}
        ).decode()

    path = "notebooks/explore.ipynb"
    assert (
        assess_modification_risk({"file_path": path, "code": nb("%matplotlib inline\nx = 1")})
        == "low"
    )
    assert assess_modification_risk({"file_path": path, "code": nb("x = 1", "(eval)(p)")}) == "high"
    assert assess_modification_risk({"file_path": path, "code": nb("!rm -rf ~")}) == "high"


def test_core_paths_are_a_room_setting() -> None:
    mine = ("pipelines/**", "Makefile")
    assert (
        assess_modification_risk({"file_path": "pipelines/a/b.py", "code": "x = 1"}, mine) == "high"
    )
    assert assess_modification_risk({"file_path": "Makefile", "code": "x"}, mine) == "high"
    assert assess_modification_risk({"file_path": "pyproject.toml", "code": "x"}, mine) == "medium"


def test_risk_rejects_malformed_modification() -> None:
    with pytest.raises(ModificationRejected) as exc:
        assess_modification_risk({"file_path": "", "code": "x"})
    assert exc.value.reason == "wrong-schema"
    with pytest.raises(ModificationRejected) as exc:
        assess_modification_risk({"file_path": "a.py", "code": "x" * (1024 * 1024 + 1)})
    assert exc.value.reason == "oversized"


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("modification", "approve", "reason_part"),
    [
        (
            {
                "file_path": "src/pkg/__init__.py",
                "code": "eval(x)",
                "reason": "a long enough rationale",
            },
            False,
            "eval",
        ),
        ({"file_path": "notes/a.py", "code": "exec('1')"}, False, "eval"),
        (
            {
                "file_path": "pyproject.toml",
                "operation": "DELETE",
                "reason": "obsolete module, replaced",
            },
            False,
            "deleting a core file",
        ),
        ({"file_path": "analysis/run.py", "code": "x = 1"}, True, "medium"),
        ({"file_path": "README.md", "code": "# hi"}, True, "low"),
        ({"file_path": "requirements.txt", "code": "x = 1"}, False, "without a rationale"),
        (
            {
                "file_path": "requirements.txt",
                "code": "x = 1",
                "reason": "fixes the retry loop bug",
            },
            True,
            "rationale",
        ),
        (
            {"file_path": "analysis/old.py", "operation": "DELETE", "reason": "superseded by v2"},
            True,
            "rationale",
        ),
    ],
)
def test_default_vote_policy(modification: dict[str, Any], approve: bool, reason_part: str) -> None:
    me = Identity.generate()
    proposal = make_proposal(me, modification, [me.peer_id], now=NOW)
    decided, why = DefaultVotePolicy().decide(proposal, Modification(**modification))
    assert decided is approve
    assert reason_part in why


async def test_respond_to_proposal(peers: list[Identity], proposal: Proposal) -> None:
    ballot = await respond_to_proposal(peers[1], proposal, MOD, DefaultVotePolicy(), NOW + 1)
    assert verify_ballot(ballot, proposal) and ballot.approve

    swapped = {**MOD, "code": "eval(payload)"}
    mismatch = await respond_to_proposal(peers[2], proposal, swapped, DefaultVotePolicy(), NOW)
    assert not mismatch.approve and mismatch.reason == "content-mismatch"

    class AsyncPolicy:
        async def decide(self, proposal: Proposal, modification: Modification) -> tuple[bool, str]:
            return False, "the human said no"

    human = await respond_to_proposal(peers[3], proposal, MOD, AsyncPolicy(), NOW + 1)
    assert not human.approve and human.reason == "the human said no"
    # a human who answers after the deadline produces a late ballot, not a backdated one
    slow = await respond_to_proposal(
        peers[3], proposal, MOD, AsyncPolicy(), NOW + 1, clock=lambda: NOW + 45
    )
    assert slow.cast_at == NOW + 45 and not verify_ballot(slow, proposal)

    for who, prop, at, reason in (
        (Identity.generate(), proposal, NOW + 1, "non-member"),
        (peers[1], proposal, NOW + 60, "late"),
        (peers[1], msgspec.structs.replace(proposal, rationale="x"), NOW + 1, "bad-signature"),
    ):
        with pytest.raises(ConsensusError) as exc:
            await respond_to_proposal(who, prop, MOD, DefaultVotePolicy(), at)
        assert exc.value.reason == reason
