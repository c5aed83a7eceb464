"""Candidates that arrive before the remote description are kept, not lost.

aiortc puts its candidates in the SDP and does not trickle, so the answering side is
made to behave like a trickling browser: it sends each of its candidates as a separate
signal first, then an answer with no candidates in it. The link can only come up if the
offerer queued the early candidates and applied them once the answer arrived.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swarm_notebook.identity import Identity
from swarm_notebook.signaling import SignalingConfig, SignalingServer
from swarm_notebook.transport.backends.select import backend_name
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig

pytestmark = pytest.mark.timeout(60)


def remote_host_candidates(pc: Any) -> set[tuple[str, int]]:
    """(address, port) of the host candidates the offerer's ICE agent holds for the peer."""
    if pc.name == "aiortc":
        ice = pc.raw.sctp.transport.transport
        return {(c.ip, c.port) for c in ice.getRemoteCandidates() if c.type == "host"}
    # libdatachannel adds each remote candidate to its copy of the remote description.
    found = set()
    for line in str(pc._pc.remote_description()).splitlines():
        fields = line.split()
        if line.startswith("a=candidate:") and fields[7] == "host":
            found.add((fields[4], int(fields[5])))
    return found


async def test_early_trickled_candidates_are_queued_and_used() -> None:
    server = SignalingServer(SignalingConfig(port=0))
    await server.start()
    offerer_id, answerer_id = sorted(
        (Identity.generate(), Identity.generate()), key=lambda i: i.peer_id
    )
    # Trickling is WebRTC's: a direct link would skip ICE, so direct tests its aiortc.
    chosen = backend_name()
    config = MeshConfig(backend="aiortc" if chosen == "direct" else chosen)
    offerer = mesh_transport(offerer_id, server.url, "trickle", config=config)
    answerer = mesh_transport(answerer_id, server.url, "trickle", config=config)
    sent_early: list[dict[str, Any]] = []
    real_send = answerer._signaling.send_signal

    async def trickling_send(to: str, data: dict[str, Any]) -> None:
        if data.get("kind") != "answer":
            await real_send(to, data)
            return
        lines = data["sdp"].splitlines()
        candidates = [line[2:] for line in lines if line.startswith("a=candidate:")]
        assert candidates, "aiortc's answer should carry its candidates"
        for candidate in candidates:
            signal = {
                "kind": "candidate",
                "session": data["session"],
                "candidate": {"candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0},
            }
            sent_early.append(signal)
            await real_send(to, signal)
        bare = [
            line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))
        ]
        await real_send(to, {**data, "sdp": "\r\n".join(bare) + "\r\n"})

    answerer._signaling.send_signal = trickling_send  # type: ignore[method-assign]
    up = asyncio.Event()
    offerer.callbacks.on_peer_up = lambda peer: up.set()
    try:
        await offerer.start()
        await answerer.start()
        await asyncio.wait_for(up.wait(), 30)
        assert sent_early and offerer.connected_peers() == [answerer_id.peer_id]
        assert offerer.rejections.by_reason.get("stale-candidate", 0) == 0
        # ICE alone could still connect through peer-reflexive candidates learnt from the
        # answerer's checks; what proves the queue is that the trickled host candidates
        # themselves reached the offerer's ICE agent.
        remote = remote_host_candidates(offerer._links[answerer_id.peer_id].pc)
        trickled = {
            (fields[4], int(fields[5]))
            for fields in (s["candidate"]["candidate"].split() for s in sent_early)
        }
        assert trickled and trickled <= remote
    finally:
        await offerer.close()
        await answerer.close()
        await server.close()
