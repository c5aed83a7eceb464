"""Reflections: signing, the SQLite store, the gate for shared reflections, ranking."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.identity import Identity
from swarm_notebook.knowledge import (
    GateConfig,
    Reflection,
    ReflectionLimits,
    ReflectionStore,
    SharedReflectionGate,
    content_hash,
    encode_reflection,
    merge_knowledge,
    merge_knowledge_detailed,
    sign_reflection,
    validate_reflection,
    verify_reflection,
)

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


def lesson(identity: Identity, description: str, **kw: object) -> Reflection:
    fields: dict[str, object] = {
        "category": "pandas",
        "description": description,
        "outcome": "successful",
        "recommendations": ["check dtypes first"],
        "tags": ["pandas", "merge"],
        "timestamp": NOW,
    }
    fields.update(kw)
    return sign_reflection(identity, **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ signing / hashing


def test_signature_verifies_and_breaks_on_any_content_change(alice: Identity) -> None:
    r = lesson(alice, "merge on a categorical key is 3x faster")
    assert verify_reflection(r)
    for change in (
        {"description": "merge on a categorical key is 30x faster"},
        {"outcome": "partial"},
        {"recommendations": ("something else",)},
        {"tags": ("pandas",)},
        {"timestamp": NOW + 1},
        {"author": Identity.generate().peer_id},
    ):
        assert not verify_reflection(msgspec.structs.replace(r, **change)), change


def test_content_hash_ignores_author_time_signature_and_tag_order(
    alice: Identity, bob: Identity
) -> None:
    a = lesson(alice, "same lesson", tags=["x", "y"])
    b = lesson(bob, "same lesson", tags=["y", "x", "x"], timestamp=NOW + 50)
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(lesson(alice, "another lesson"))


def test_validate_reports_schema_and_size_reasons() -> None:
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection({"category": "x", "description": 5, "outcome": "successful"})
    assert exc.value.reason == "wrong-schema"
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection({"category": "x", "description": "d", "outcome": "ok", "evil": 1})
    assert exc.value.reason == "wrong-schema"
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection({"category": "x", "description": "d" * 5000, "outcome": "ok"})
    assert exc.value.reason == "oversized"
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection(b"\xc1" * 20_000)
    assert exc.value.reason == "oversized"
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection({"category": "x", "description": "d\x00", "outcome": "ok"})
    assert exc.value.reason == "wrong-schema"
    with pytest.raises(ReflectionRejected) as exc:
        validate_reflection(
            {"category": "x", "description": "d", "outcome": "ok", "tags": ["shared_from_me"]}
        )
    assert exc.value.reason == "reserved-tag"


# ------------------------------------------------------------------------------ store


def test_store_add_search_get_dedupe(tmp_path: Path, alice: Identity) -> None:
    with ReflectionStore(tmp_path / "r.sqlite") as store:
        assert store.search_backend == "fts5"
        merge = lesson(alice, "pandas merge with validate='one_to_one' catches duplicates")
        parquet = lesson(alice, "write parquet instead of csv", category="io", tags=["io"])
        plot = lesson(alice, "matplotlib agg backend in workers", category="plot", tags=[])
        ids = [store.add_reflection(r) for r in (merge, parquet, plot)]
        assert [created for _, created in ids] == [True, True, True]
        assert store.add_reflection(merge) == (ids[0][0], False)
        assert store.count() == 3

        hits = store.search_reflections(["merge", "duplicates", "pandas"])
        assert hits[0].reflection == merge
        assert hits[0].score == 3
        assert [h.reflection for h in store.search_reflections("parquet")] == [parquet]
        assert store.search_reflections(["nothing-like-this"]) == []
        # prefix match: "dup" finds "duplicates"
        assert store.search_reflections(["dup"])[0].reflection == merge

        got = store.get(ids[1][0])
        assert got is not None and got.reflection == parquet and verify_reflection(got.reflection)
        assert store.get(999) is None
        assert [s.reflection for s in store.recent(2)] == [plot, parquet]


def test_like_backend_ranks_the_same(tmp_path: Path, alice: Identity) -> None:
    with ReflectionStore(tmp_path / "r.sqlite", full_text=False) as store:
        assert store.search_backend == "like"
        store.add_reflection(lesson(alice, "groupby then merge"))
        store.add_reflection(lesson(alice, "use 100% of the cores", tags=[]))
        best = store.search_reflections(["groupby", "merge"])
        assert best[0].reflection.description == "groupby then merge"
        assert best[0].score == 2
        # LIKE wildcards in a keyword are matched literally
        assert store.search_reflections(["%"]) == store.recent(5)


def test_shared_reflection_tagged_and_sourced(tmp_path: Path, alice: Identity) -> None:
    with ReflectionStore(tmp_path / "r.sqlite") as store:
        r = lesson(alice, "set OMP_NUM_THREADS=1 in workers")
        rid, created = store.add_reflection(r, shared_from=alice.peer_id)
        stored = store.get(rid)
        assert created and stored is not None
        assert stored.source == "swarm"
        assert f"shared_from_{alice.peer_id}" in stored.tags
        # the signed content is unchanged, so the signature still verifies
        assert verify_reflection(stored.reflection)
        assert stored.to_dict()["stored_tags"][-1] == f"shared_from_{alice.peer_id}"
        assert store.has_content_hash(content_hash(r))
        assert store.count("swarm") == 1 and store.count("local") == 0
        # provenance tags are searchable
        assert store.search_reflections([f"shared_from_{alice.peer_id}"])[0].id == rid


def test_store_survives_reopen(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "r.sqlite"
    r = lesson(alice, "persist me")
    with ReflectionStore(path) as store:
        rid, _ = store.add_reflection(r, shared_from=alice.peer_id)
    with ReflectionStore(path) as store:
        assert store.count() == 1
        assert store.add_reflection(r) == (rid, False)
        assert store.search_reflections(["persist"])[0].reflection == r
    # a file written with the LIKE backend gets indexed when reopened with FTS5
    with ReflectionStore(path, full_text=False) as store:
        store.add_reflection(lesson(alice, "written without the index"))
    with ReflectionStore(path) as store:
        assert store.search_reflections(["index"])[0].reflection.description == (
            "written without the index"
        )
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_store_caps_swarm_reflections_not_local(tmp_path: Path, alice: Identity) -> None:
    with ReflectionStore(tmp_path / "r.sqlite", max_swarm_reflections=1) as store:
        store.add_reflection(lesson(alice, "one"), shared_from="peer")
        with pytest.raises(ReflectionRejected) as exc:
            store.add_reflection(lesson(alice, "two"), shared_from="peer")
        assert exc.value.reason == "store-full"
        store.add_reflection(lesson(alice, "three"))
        assert store.count() == 2
        with pytest.raises(ReflectionRejected) as exc:
            store.add_reflection(lesson(alice, "four"), shared_from="two words")
        assert exc.value.reason == "wrong-schema"


# ------------------------------------------------------------------------------- gate


def _reject(gate: SharedReflectionGate, sender: str, obj: object, now: float = NOW) -> str:
    with pytest.raises(ReflectionRejected) as exc:
        gate.check(sender, obj, now)
    return exc.value.reason


def test_gate_rejects_each_bad_kind_with_its_reason(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    with ReflectionStore(tmp_path / "r.sqlite") as store:
        gate = SharedReflectionGate(
            GateConfig(max_age_s=3600, max_future_s=60), is_known=store.has_content_hash
        )
        good = lesson(alice, "accepted lesson")
        assert gate.check(alice.peer_id, msgspec.to_builtins(good), NOW) == good
        store.add_reflection(good, shared_from=alice.peer_id)

        forged = msgspec.structs.replace(lesson(alice, "forged"), description="tampered")
        assert _reject(gate, alice.peer_id, msgspec.to_builtins(forged)) == "bad-signature"
        signed_by_bob = msgspec.structs.replace(lesson(bob, "claims alice"), author=alice.peer_id)
        assert _reject(gate, alice.peer_id, signed_by_bob) == "bad-signature"
        assert _reject(gate, alice.peer_id, encode_reflection(good)) == "replayed"
        roomy = ReflectionLimits(description=100_000, encoded_bytes=1_000_000)
        huge = lesson(bob, "x" * 4001, limits=roomy)
        assert verify_reflection(huge)
        assert _reject(gate, bob.peer_id, huge) == "oversized"
        many = lesson(bob, "m" * 3000, recommendations=["r" * 1000] * 16, limits=roomy)
        assert _reject(gate, bob.peer_id, encode_reflection(many)) == "oversized"
        assert _reject(gate, bob.peer_id, lesson(bob, "failed", outcome="failed")) == (
            "not-successful"
        )
        old = lesson(bob, "old news", timestamp=NOW - 7200)
        assert _reject(gate, bob.peer_id, old) == "stale"
        future = lesson(bob, "from the future", timestamp=NOW + 600)
        assert _reject(gate, bob.peer_id, future) == "stale"
        assert _reject(gate, bob.peer_id, lesson(alice, "relayed")) == "author-mismatch"
        assert _reject(gate, bob.peer_id, {"description": []}) == "wrong-schema"

        assert gate.accepted == 1
        assert gate.rejections == {
            "bad-signature": 2,
            "replayed": 1,
            "oversized": 2,
            "not-successful": 1,
            "stale": 2,
            "author-mismatch": 1,
            "wrong-schema": 1,
        }

    # replay detection through the store survives a restart (fresh gate, reopened file)
    with ReflectionStore(tmp_path / "r.sqlite") as store:
        gate = SharedReflectionGate(is_known=store.has_content_hash)
        assert _reject(gate, alice.peer_id, good) == "replayed"


def test_gate_rate_limits_per_sender(alice: Identity, bob: Identity) -> None:
    gate = SharedReflectionGate(GateConfig(rate_per_s=1.0, burst=3))
    for i in range(3):
        gate.check(alice.peer_id, lesson(alice, f"burst {i}"), NOW)
    assert _reject(gate, alice.peer_id, lesson(alice, "one too many")) == "rate-limited"
    # another sender has its own bucket
    gate.check(bob.peer_id, lesson(bob, "bob is fine"), NOW)
    # one second later one token is back
    gate.check(alice.peer_id, lesson(alice, "after a second"), NOW + 1.0)
    assert _reject(gate, alice.peer_id, lesson(alice, "again"), NOW + 1.0) == "rate-limited"
    assert gate.rejections == {"rate-limited": 2}
    assert gate.accepted == 5


# ---------------------------------------------------------------------------- ranking


def test_merge_attributes_and_dedupes(alice: Identity, bob: Identity) -> None:
    carol = Identity.generate().peer_id
    shared = lesson(alice, "categorical merge keys save memory")
    only_bob = lesson(bob, "merge after dropping duplicates", tags=["merge"])
    unrelated = lesson(bob, "restart the kernel", category="jupyter", tags=[], recommendations=[])
    local = [{**msgspec.to_builtins(shared), "id": 1, "source": "local"}]
    remote = {
        alice.peer_id: [msgspec.to_builtins(shared)],
        bob.peer_id: [msgspec.to_builtins(only_bob), msgspec.to_builtins(unrelated)],
        carol: [msgspec.to_builtins(shared), {"description": 42}],
    }
    detailed = merge_knowledge_detailed(local, remote, "categorical merge memory")
    items = detailed.items
    assert [i["description"] for i in items] == [
        shared.description,
        only_bob.description,
        unrelated.description,
    ]
    assert items[0]["from_peer"] == ["local", alice.peer_id, carol]
    assert items[1]["from_peer"] == [bob.peer_id]
    assert items[0]["score"] == 3 and items[2]["score"] == 0
    assert all(i["verified"] for i in items)
    assert detailed.rejected == [
        {"from_peer": carol, "reason": "wrong-schema", "message": detailed.rejected[0]["message"]}
    ]
    assert len(merge_knowledge(local, remote, "merge", limit=1)) == 1


def test_merge_bounds_items_per_source(alice: Identity) -> None:
    many = [msgspec.to_builtins(lesson(alice, f"lesson {i}")) for i in range(5)]
    detailed = merge_knowledge_detailed([], {"p": many}, "lesson", max_items_per_source=3)
    assert len(detailed.items) == 3
    assert [r["reason"] for r in detailed.rejected] == ["too-many-items"]


def test_unverified_never_outranks_verified(alice: Identity, bob: Identity) -> None:
    # Finding 10: a forged-author reflection ranked first although verified was False.
    honest = lesson(alice, "merge with validate", tags=[], recommendations=[])
    forged = msgspec.structs.replace(
        lesson(bob, "merge merge pandas memory categorical keys", tags=["merge", "memory"]),
        author=alice.peer_id,  # claims alice wrote it; bob's signature cannot verify
    )
    unsigned = msgspec.structs.replace(forged, signature="", description="merge memory tip")
    remote = {
        bob.peer_id: [msgspec.to_builtins(forged), msgspec.to_builtins(unsigned)],
        alice.peer_id: [msgspec.to_builtins(honest)],
    }
    items = merge_knowledge([], remote, "merge memory categorical keys")
    assert [i["verified"] for i in items] == [True, False, False]
    assert items[0]["description"] == honest.description
    assert items[1]["score"] > items[0]["score"]  # better match, still ranked below
    assert merge_knowledge([], remote, "merge", limit=1)[0]["verified"] is True


def test_artifact_scan_never_follows_a_symlink_out(tmp_path: Path) -> None:
    from swarm_notebook.knowledge.service import artifact_path_problem, scan_artifacts

    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "sales.csv").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sales_secret.csv").write_text("x")
    (ws / "sales_link.csv").symlink_to(outside / "sales_secret.csv")
    (ws / "sales_dir").symlink_to(outside, target_is_directory=True)
    found = scan_artifacts(ws, "sales", 10)
    assert [a["path"] for a in found] == ["data/sales.csv"]
    assert all(artifact_path_problem(a["path"]) is None for a in found)
    for bad in ["../../etc/passwd", "/etc/passwd", "a/../../b", "~/x", "C:/x", "a\\b", "./a"]:
        assert artifact_path_problem(bad) is not None, bad
