"""Finding 10: what a hostile peer's knowledge answer can and cannot do.

Three real peer processes (``tests/support/knowledge_peer.py``): an honest author, a liar
that answers with a forged-author reflection and artifact paths outside any workspace,
and the asker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from swarm_notebook.signaling import SignalingServer
from tests.test_knowledge_consensus import pid, start_peer, stop_all, wait_connected

pytestmark = pytest.mark.timeout(180)

LESSON = {
    "category": "pandas",
    "description": "pandas merge(validate='one_to_one') catches duplicate keys",
    "outcome": "successful",
    "tags": ["merge"],
}
BAD_PATHS = ["../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "data/../../x.csv", "C:/boot.ini"]


async def test_forged_reflections_rank_last_and_artifact_paths_are_validated(
    server: SignalingServer, tmp_path: Path
) -> None:
    honest, liar, asker = await asyncio.gather(
        *(start_peer(server.url, tmp_path / n, n) for n in ("honest", "liar", "asker"))
    )
    peers = [honest, liar, asker]
    try:
        for p in peers:
            await wait_connected(p, 2)
        await honest.call("add", reflection=LESSON)
        await liar.call(
            "hostile-answers", impersonate=pid(honest), paths=[*BAD_PATHS, "data/merge.csv"]
        )
        found = (await asker.call("query", query="pandas merge", peer_timeout=5))["found"]
        assert found["peers"] == {pid(honest): "answered", pid(liar): "answered"}
        ranked = found["reflections"]
        # The forged one matches the query better, yet the verified one comes first.
        assert [r["verified"] for r in ranked] == [True, False]
        assert ranked[0]["description"] == LESSON["description"]
        assert ranked[1]["author"] == pid(honest) and ranked[1]["from_peer"] == [pid(liar)]
        paths = [a["path"] for a in found["artifacts"]]
        assert paths == ["data/merge.csv"]  # the plain relative path is kept
        refused = [r for r in found["rejected"] if r["reason"] == "path-outside-workspace"]
        assert len(refused) == len(BAD_PATHS) and {r["from_peer"] for r in refused} == {pid(liar)}
        stats = await asker.call("knowledge-stats")
        assert stats["answer_rejections"]["path-outside-workspace"] == len(BAD_PATHS)
        # The honest peer keeps being heard after the lies.
        again = (await asker.call("query", query="duplicate keys", peer_timeout=5))["found"]
        assert again["reflections"][0]["verified"] is True
        assert again["reflections"][0]["from_peer"] == [pid(honest)]
    finally:
        await stop_all(peers)
