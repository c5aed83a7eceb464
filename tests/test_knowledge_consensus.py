"""Knowledge and consensus between real aiortc peers in separate processes.

Each peer (``tests/support/knowledge_peer.py``) runs the knowledge and consensus services
on a SwarmNode over the aiortc mesh, with its reflection store and audit log as SQLite
files in its profile folder; a real signaling server runs on loopback in this process.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.governance import verify_consensus
from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import make_roster, save_roster
from swarm_notebook.signaling import SignalingServer
from tests.support.procs import PeerProcess, child_processes

pytestmark = pytest.mark.timeout(120)

PANDAS_LESSON = {
    "category": "pandas",
    "description": "pandas merge(validate='one_to_one') catches duplicate keys",
    "outcome": "successful",
    "tags": ["merge"],
}


async def start_peer(url: str, profile: Path, name: str, *extra: str) -> PeerProcess:
    peer = await PeerProcess.start(
        "knowledge_peer.py", "--signaling", url, "--profile", str(profile), *extra, name=name
    )
    ready = await peer.wait_for(lambda e: e.get("event") == "ready", 30)
    peer.peer_id = ready["peer_id"]  # type: ignore[attr-defined]
    return peer


async def wait_connected(peer: PeerProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # Marked before asking: a peer_up printed while the answer is on its way counts.
        mark = len(peer.events)
        if len((await peer.call("peers"))["connected"]) >= count:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{peer.name} has fewer than {count} peers after {timeout} s")
        await peer.wait_for(lambda e: e.get("event") == "peer_up", remaining, start=mark)


async def wait_event(peer: PeerProcess, mark: int, timeout: float = 10, **fields: Any) -> dict:
    return await peer.wait_for(
        lambda e: all(e.get(k) == v for k, v in fields.items()), timeout, start=mark
    )


async def stop_all(peers: list[PeerProcess]) -> None:
    codes = await asyncio.gather(*(p.stop() for p in peers))
    for p, code in zip(peers, codes, strict=True):
        assert code == 0, f"{p.name} exited {code}: {''.join(p.stderr_lines[-20:])}"
        assert p.problems() == [], p.problems()


def pid(peer: PeerProcess) -> str:
    return peer.peer_id  # type: ignore[attr-defined]


async def audit_outcomes(peer: PeerProcess, operation: str) -> list[str]:
    rows = (await peer.call("audit", operation=operation))["rows"]
    return [row["outcome"] for row in reversed(rows)]


async def test_reflections_and_knowledge_between_processes(
    server: SignalingServer, tmp_path: Path
) -> None:
    a, b, c = await asyncio.gather(
        *(start_peer(server.url, tmp_path / n, n) for n in ("a", "b", "c"))
    )
    peers = [a, b, c]
    try:
        for p in peers:
            await wait_connected(p, 2)

        # A successful lesson reaches both peers, stored with its provenance.
        marks = [len(b.events), len(c.events)]
        assert (await a.call("share", reflection=PANDAS_LESSON))["reached"] == 2
        for p, mark in zip((b, c), marks, strict=True):
            got = await wait_event(p, mark, event="notify", name="swarm:reflection-integrated")
            assert got["payload"]["peer_id"] == pid(a)
        [row] = (await b.call("records"))["records"]
        assert (row["source"], row["shared_from"]) == ("swarm", pid(a))
        assert f"shared_from_{pid(a)}" in row["tags"]

        # Only successful ones are shared: the failed one never arrives before the next.
        failed = {**PANDAS_LESSON, "description": "iterrows over 1e6 rows", "outcome": "failed"}
        assert (await a.call("share", reflection=failed))["reached"] == 0
        mark = len(b.events)
        second = {**PANDAS_LESSON, "description": "pandas categoricals save memory"}
        assert (await a.call("share", reflection=second))["reached"] == 2
        await wait_event(b, mark, event="notify", name="swarm:reflection-integrated")
        assert sorted(r["description"] for r in (await b.call("records"))["records"]) == [
            "pandas categoricals save memory",
            "pandas merge(validate='one_to_one') catches duplicate keys",
        ]

        # A replayed, a forged and an oversized reflection are refused and audited.
        for kind, reason in (
            ("replay", "replayed"),
            ("bad-signature", "bad-signature"),
            ("oversized", "oversized"),
        ):
            mark = len(b.events)
            await a.call("inject-reflection", peer=pid(b), kind=kind)
            await wait_event(
                b, mark, event="audit", operation="reflection-rejected", outcome=reason
            )
        assert len((await b.call("records"))["records"]) == 2

        # query_knowledge merges the answers of both peers, attributed.
        await b.call("add", reflection={**PANDAS_LESSON, "description": "pandas groupby observed"})
        answer = await c.call("query", query="pandas", peer_timeout=5)
        found = answer["found"]
        assert found["peers"] == {pid(a): "answered", pid(b): "answered"}
        sources = {r["description"]: r["from_peer"] for r in found["reflections"]}
        assert sources["pandas groupby observed"] == [pid(b)]
        assert pid(a) in sources["pandas merge(validate='one_to_one') catches duplicate keys"]
        assert all(r["verified"] for r in found["reflections"])
        assert "iterrows over 1e6 rows" not in sources  # a's failed lesson stays with a

        # b frozen (SIGSTOP): a's answers come back after b's timeout, marked partial.
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            partial = await c.call("query", query="pandas", peer_timeout=1.5)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        assert 1.5 <= partial["seconds"] < 5.0
        assert partial["found"]["peers"] == {pid(a): "answered", pid(b): "timeout"}
        descriptions = {r["description"] for r in partial["found"]["reflections"]}
        assert "pandas groupby observed" not in descriptions
        assert "pandas categoricals save memory" in descriptions
        assert await audit_outcomes(c, "knowledge-query") == ["ok", "partial"]

        # b restarts with the same profile: its store is still there, and it still
        # remembers what it already received (a replay after the restart is refused).
        await b.stop()
        assert b.problems() == [], b.problems()
        b = await start_peer(server.url, tmp_path / "b", "b-again")
        peers[1] = b
        await wait_connected(b, 2)
        records = (await b.call("records"))["records"]
        assert sorted((r["source"], r["description"]) for r in records) == [
            ("local", "pandas groupby observed"),
            ("swarm", "pandas categoricals save memory"),
            ("swarm", "pandas merge(validate='one_to_one') catches duplicate keys"),
        ]
        mark = len(b.events)
        await a.call("inject-reflection", peer=pid(b), kind="replay")
        await wait_event(
            b, mark, event="audit", operation="reflection-rejected", outcome="replayed"
        )

        # Every operation left its row in the audit log (b's survived the restart).
        assert await audit_outcomes(a, "reflection-shared") == [
            "sent",
            "skipped:not-successful",
            "sent",
        ]
        assert await audit_outcomes(b, "reflection-integrated") == ["stored", "stored"]
        assert await audit_outcomes(b, "reflection-rejected") == [
            "replayed",
            "bad-signature",
            "oversized",
            "replayed",
        ]
        assert await audit_outcomes(c, "reflection-integrated") == ["stored", "stored"]
    finally:
        await stop_all(peers)
    assert child_processes() == []


def put_on_roster(room: str, *profiles: Path) -> None:
    """Keys for ``profiles`` and a roster owned by the first, saved in every profile."""
    ids = [Identity.load_or_create(p) for p in profiles]
    roster = make_roster(
        ids[0], room, {i.peer_id: p.name for i, p in zip(ids, profiles, strict=True)}
    )
    for p in profiles:
        save_roster(p, roster)


async def test_signed_consensus_between_processes(server: SignalingServer, tmp_path: Path) -> None:
    # eval in a core file is high risk: only a room with a roster votes on it.
    put_on_roster("test", *(tmp_path / n for n in ("a", "b", "c")))
    started = await asyncio.gather(
        *(start_peer(server.url, tmp_path / n, n) for n in ("a", "b", "c")),
        start_peer(server.url, tmp_path / "alone", "alone", "--room", "solo"),
    )
    a, b, c, alone = started
    peers = list(started)
    try:
        # Nobody to ask: the blueprint's fallback, and fail-closed when configured.
        lone = (await alone.call("consensus", modification={"file_path": "x.py"}))["result"]
        assert (lone["consensus"], lone["reason"]) == (True, "swarm-not-available")
        await alone.call("settings", consensus={"fail_closed": True})
        lone = (await alone.call("consensus", modification={"file_path": "x.py"}))["result"]
        assert (lone["consensus"], lone["reason"]) == (False, "swarm-not-available")
        assert await audit_outcomes(alone, "consensus-result") == ["swarm-not-available"] * 2

        for p in (a, b, c):
            await wait_connected(p, 2)

        # Peers approve a harmless change; anyone can re-check the signed result.
        benign = {"file_path": "analysis/clean.py", "code": "df = df.dropna()", "reason": "tidy"}
        approved = (await a.call("consensus", modification=benign))["result"]
        assert (approved["consensus"], approved["reason"]) == (True, "approved")
        assert sorted(approved["proposal"]["members"]) == sorted([pid(b), pid(c)])
        assert verify_consensus(approved)
        tampered = copy.deepcopy(approved)
        tampered["votes"][pid(b)]["approve"] = False
        tampered["approve_count"] -= 1
        tampered["reject_count"] += 1
        assert not verify_consensus(tampered)

        # eval in a core file: refused by the default policy of every voter.
        risky = {
            "file_path": "src/pkg/__init__.py",
            "code": "eval(msg)",
            "reason": "x",
        }
        refused = (await a.call("consensus", modification=risky))["result"]
        assert (refused["consensus"], refused["reason"]) == (False, "rejected")
        assert {v["reason"] for v in refused["votes"].values()} == {
            "refused: the code calls eval()/exec() or the like (line 1: refers to eval)"
        }
        assert verify_consensus(refused, detail=True)["electorate"] == "roster"

        # Forged, non-member and duplicate ballots arrive while the vote is open.
        await b.call("hold-votes")
        await c.call("hold-votes")
        mark = len(c.events)
        asking = asyncio.create_task(a.call("consensus", modification=benign, timeout=60))
        await wait_event(c, mark, event="vote-asked")
        injected = await c.call("inject-ballots", peer=pid(a))
        assert not asking.done()
        await b.call("release-votes")
        result = (await asking)["result"]
        assert (result["consensus"], result["reason"]) == (True, "approved")
        assert result["ignored_counts"] == {"forged": 1, "non-member": 1, "duplicate": 1}
        assert {(i["voter"], i["reason"]) for i in result["ignored"]} == {
            (pid(c), "forged"),
            (injected["outsider"], "non-member"),
            (pid(c), "duplicate"),
        }
        assert verify_consensus(result)

        # Nobody decides in time: consensus False, reason timeout.
        await a.call("settings", consensus={"timeout_s": 1.5})
        await b.call("hold-votes")
        await c.call("hold-votes")
        late = await a.call("consensus", modification=benign)
        assert (late["result"]["consensus"], late["result"]["reason"]) == (False, "timeout")
        assert 1.5 <= late["seconds"] < 5.0
        assert sorted(late["result"]["missing"]) == sorted([pid(b), pid(c)])

        # The audit trail of all of it.
        assert await audit_outcomes(a, "consensus-result") == [
            "approved",
            "rejected",
            "approved",
            "timeout",
        ]
        assert len(await audit_outcomes(a, "proposal-created")) == 4
        received = await audit_outcomes(a, "ballot-received")
        for outcome in ("ignored:forged", "ignored:non-member", "ignored:duplicate"):
            assert received.count(outcome) == 1
        # One rejection of two decides, so the second ballot may come too late to count.
        results = (approved, refused, result, late["result"])
        assert received.count("counted") == sum(len(r["ballots"]) for r in results)
        for voter in (b, c):
            cast = await audit_outcomes(voter, "ballot-cast")
            assert cast[0] == "approve"
            if pid(voter) in refused["votes"]:
                assert cast[1] == "reject"
    finally:
        await stop_all(peers)
    assert child_processes() == []
