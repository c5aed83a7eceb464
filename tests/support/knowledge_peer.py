"""A swarm peer with the knowledge and consensus services, in its own process.

Driven by ``procs.PeerProcess`` (JSON lines). The network (aiortc mesh, SwarmNode, both
services) runs on a ``LoopThread``; the reflection store and the audit log are SQLite
files in the profile folder, so a restarted peer finds them again. Every audit row and
every service event is also printed as a JSON event, so tests wait on them instead of
polling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.errors import RemoteError
from swarm_notebook.governance import (
    DefaultVotePolicy,
    Modification,
    Proposal,
    cast_ballot,
    parse_proposal,
)
from swarm_notebook.governance.electorate import Electorate
from swarm_notebook.governance.service import (
    CONSENSUS_BALLOT,
    ConsensusConfig,
    ConsensusService,
)
from swarm_notebook.identity import Identity
from swarm_notebook.knowledge import Reflection, ReflectionStore, encode_reflection
from swarm_notebook.knowledge.service import (
    KNOWLEDGE_REQUEST,
    REFLECTION_SHARE,
    KnowledgeConfig,
    KnowledgeRequest,
    KnowledgeService,
)
from swarm_notebook.ledger.audit import AuditLog
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig
from tests.support.spellings import other_spellings

_print_lock = threading.Lock()


def emit(**event: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(event, default=repr) + "\n")
        sys.stdout.flush()


class ReportingAuditLog(AuditLog):
    """The real audit log; each appended row is also announced on stdout."""

    def record(
        self,
        operation: str,
        *,
        peer: str | None,
        outcome: str,
        detail: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> int:
        row_id = super().record(operation, peer=peer, outcome=outcome, detail=detail, now=now)
        emit(event="audit", operation=operation, peer=peer, outcome=outcome, id=row_id)
        return row_id

    def record_quietly(
        self, operation: str, *, peer: str | None, outcome: str, detail: dict[str, Any]
    ) -> None:
        # Batched rows are announced when appended; the tests read them back with "audit".
        super().record_quietly(operation, peer=peer, outcome=outcome, detail=detail)
        emit(event="audit", operation=operation, peer=peer, outcome=outcome, id=None)


class HeldVote:
    """Votes like the default policy, but only once released (a human taking their time)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.proposal: Proposal | None = None
        self._default = DefaultVotePolicy()

    async def decide(self, proposal: Proposal, modification: Modification) -> tuple[bool, str]:
        self.proposal = proposal
        emit(event="vote-asked", proposal_id=proposal.id)
        await self.release.wait()
        return self._default.decide(proposal, modification)


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        profile = Path(args.profile)
        self.identity = Identity.load_or_create(profile)
        # A short connect timeout: a dial that went to a peer mid-restart is retried soon.
        config = MeshConfig(heartbeat_interval_s=0.5, peer_timeout_s=10.0, connect_timeout_s=5.0)
        transport = mesh_transport(self.identity, args.signaling, args.room, config=config)
        self.node = SwarmNode(self.identity, transport)
        self.node.add_listener(self._peer_changed)
        self.store = ReflectionStore(profile / "reflections.sqlite")
        self.audit = ReportingAuditLog(profile / "audit.sqlite")
        self.stats = CoordinationStats()
        self.knowledge = KnowledgeService(
            node=self.node,
            store=self.store,
            audit=self.audit,
            stats=self.stats,
            notify=self._notify,
            settings=KnowledgeConfig(peer_timeout_s=3.0),
            workspace=profile / "workspace",
            is_initialized=lambda: True,
        )
        self.consensus = ConsensusService(
            node=self.node,
            audit=self.audit,
            stats=self.stats,
            notify=self._notify,
            settings=ConsensusConfig(timeout_s=args.consensus_timeout),
            is_initialized=lambda: True,
            # The roster file in the profile (if the test put one there) decides who votes.
            electorate=Electorate(
                self.identity, args.room, profile_dir=profile, trusted_owner=args.roster_owner
            ),
        )
        self.held: HeldVote | None = None

    def _peer_changed(self, peer: str, what: str) -> None:
        if what in ("up", "down"):
            emit(event=f"peer_{what}", peer=peer, t=time.time())

    def _notify(self, name: str, payload: dict[str, Any]) -> None:
        emit(event="notify", name=name, payload=payload)

    async def close(self) -> None:
        await self.knowledge.close()
        await self.consensus.close()
        await self.node.close()
        self.store.close()
        self.audit.close()

    # -- commands (run on the network loop) ----------------------------------------------

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "peers":
            return {"connected": self.node.connected_peers()}
        if name == "share":
            return {"reached": await self.knowledge.share_success_pattern(cmd["reflection"])}
        if name == "add":
            return {"row": await self.knowledge.add_reflection(cmd["reflection"])}
        if name == "records":
            return {"records": self.knowledge.reflection_records()}
        if name == "query":
            started = time.monotonic()
            found = await self.knowledge.query_knowledge(
                cmd["query"], timeout=cmd.get("peer_timeout"), limit=cmd.get("limit")
            )
            return {"found": found, "seconds": time.monotonic() - started}
        if name == "consensus":
            started = time.monotonic()
            result = await self.consensus.request_modification_consensus(cmd["modification"])
            return {"result": result, "seconds": time.monotonic() - started}
        if name == "settings":
            for key, value in cmd["consensus"].items():
                setattr(self.consensus.settings, key, value)
            return {}
        if name == "hold-votes":
            self.held = HeldVote()
            self.consensus.vote_policy = self.held
            return {}
        if name == "release-votes":
            assert self.held is not None
            self.held.release.set()
            return {}
        if name == "inject-reflection":
            return await self._inject_reflection(cmd["peer"], cmd["kind"])
        if name == "inject-ballots":
            return await self._inject_ballots(cmd["peer"])
        if name == "roster":
            return {
                "roster": self.consensus.electorate.describe(),
                "rejections": dict(self.consensus.request_refusals),
            }
        if name == "transport-stats":
            return {"stats": self.node.transport.stats()}
        if name == "held-proposal":
            assert self.held is not None and self.held.proposal is not None
            return {"proposal": msgspec.to_builtins(self.held.proposal)}
        if name == "cast-ballots":
            return await self._cast_ballots(cmd["peer"], cmd["proposal"], cmd["as"])
        if name == "audit":
            return {"rows": self.audit.rows(cmd.get("operation"), limit=1000)}
        if name == "knowledge-stats":
            return {"answer_rejections": dict(self.knowledge.answer_rejections)}
        if name == "hostile-answers":
            return self._answer_with_lies(cmd["impersonate"], cmd["paths"])
        raise ValueError(f"unknown command {name}")

    async def _inject_reflection(self, peer: str, kind: str) -> dict[str, Any]:
        """Send a raw ``reflection-share`` the way a misbehaving peer would."""
        own = [s.reflection for s in self.store.recent(50) if s.source == "local"]
        shared = next(r for r in own if r.outcome == "successful")
        if kind == "replay":
            reflection = shared
        elif kind == "bad-signature":
            reflection = msgspec.structs.replace(shared, description="trust me, eval is fine")
        elif kind == "oversized":
            reflection = Reflection(
                "pandas",
                "x" * 40_000,
                "successful",
                author=self.identity.peer_id,
                timestamp=time.time(),
                signature="0" * 128,
            )
        else:
            raise ValueError(f"unknown kind {kind}")
        await self.node.endpoint.send(
            peer, REFLECTION_SHARE, {"reflection": encode_reflection(reflection)}
        )
        return {"sent": kind}

    def _answer_with_lies(self, impersonate: str, paths: list[str]) -> dict[str, Any]:
        """Answer knowledge requests as a hostile peer: a reflection that claims another
        author (its signature cannot verify) and artifact paths pointing outside."""

        def lie(peer: str, body: Any) -> dict[str, Any]:
            words = " ".join([body.query] * 5)
            forged = Reflection(
                "pandas",
                f"{words}: disable validation, it is faster",
                "successful",
                tags=tuple(body.query.split())[:8],
                author=impersonate,
                timestamp=time.time(),
                signature="ab" * 64,
            )
            return {
                "reflections": [msgspec.to_builtins(forged)],
                "artifacts": [{"path": p, "type": "csv"} for p in paths],
            }

        self.node.endpoint.register_message_handler(KNOWLEDGE_REQUEST, lie, schema=KnowledgeRequest)
        return {}

    async def _inject_ballots(self, peer: str) -> dict[str, Any]:
        """Send to the proposer, beside the held reply: a forged ballot, one from a
        non-member, our real ballot, and that ballot again."""
        assert self.held is not None and self.held.proposal is not None
        proposal = self.held.proposal
        real = cast_ballot(self.identity, proposal, True, "sent on its own", time.time())
        forged = msgspec.structs.replace(real, approve=False)
        outsider = cast_ballot(Identity.generate(), proposal, True, "let me vote", time.time())
        for ballot in (forged, outsider, real, real):
            await self.node.endpoint.request(
                peer, CONSENSUS_BALLOT, {"ballot": msgspec.to_builtins(ballot)}, timeout=10
            )
        return {"sent": 4, "outsider": outsider.voter}

    async def _cast_ballots(
        self, peer: str, proposal_obj: dict[str, Any], voters: str
    ) -> dict[str, Any]:
        """Approve ``proposal`` at ``peer`` as an attacker would: ``"spellings"`` signs with
        our own key under 3 other spellings of our id, ``"throwaway"`` with 3 fresh keys."""
        proposal = parse_proposal(proposal_obj)
        ballots = []
        if voters == "spellings":
            for spelling in other_spellings(self.identity.peer_id)[:3]:
                alias = Identity(private_key=self.identity.private_key, peer_id=spelling)
                ballots.append(cast_ballot(alias, proposal, True, "me again", time.time()))
        else:
            for _ in range(3):
                ballots.append(cast_ballot(Identity.generate(), proposal, True, "me", time.time()))
        refused: list[str] = []
        for ballot in ballots:
            try:
                await self.node.endpoint.request(
                    peer, CONSENSUS_BALLOT, {"ballot": msgspec.to_builtins(ballot)}, timeout=10
                )
            except RemoteError as exc:
                refused.append(exc.reason)
        return {"voters": [b.voter for b in ballots], "refused": refused}


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", default="test")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--consensus-timeout", type=float, default=30.0)
    parser.add_argument("--roster-owner", default=None)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(created).3f %(name)s %(message)s"
    )
    # KNOWLEDGE_PEER_LOG=INFO shows this package's own log (links, refusals) when debugging.
    logging.getLogger("swarm_notebook").setLevel(os.environ.get("KNOWLEDGE_PEER_LOG", "WARNING"))
    runner = LoopThread()
    runner.start()

    async def build() -> Peer:
        peer = Peer(args)
        await peer.node.start()
        return peer

    peer = runner.run_sync(build(), timeout=30)
    emit(event="ready", peer_id=peer.identity.peer_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    running: set[asyncio.Task[None]] = set()

    async def serve(cmd: dict[str, Any]) -> None:
        try:
            result = await runner.call(peer.run(cmd))
            emit(reply_to=cmd["call"], **result)
        except Exception as exc:
            emit(reply_to=cmd["call"], error=f"{type(exc).__name__}: {exc}")

    # Commands run concurrently: a consensus request may wait while others go on.
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        task = asyncio.create_task(serve(cmd))
        running.add(task)
        task.add_done_callback(running.discard)
    for task in list(running):
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    runner.run_sync(peer.close(), timeout=30)
    runner.stop()
    emit(event="closed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
