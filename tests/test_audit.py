"""The audit log: append-only in SQLite itself, bounded details, queries by operation."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from swarm_notebook.errors import AuditError
from swarm_notebook.ledger.audit import KNOWN_OPERATIONS, AuditLog


def test_records_rows_and_counts(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.sqlite") as log:
        first = log.record(
            "delegation-sent", peer="peer-b", outcome="ok", detail={"task": "t1"}, now=10.0
        )
        log.record("reflection-rejected", peer="peer-c", outcome="replayed", detail={}, now=11.0)
        log.record("delegation-sent", peer="peer-c", outcome="declined", detail={"task": "t2"})
        assert first == 1
        assert log.count() == 3
        assert log.count("delegation-sent") == 2
        rows = log.rows("delegation-sent")
        assert [r["detail"]["task"] for r in rows] == ["t2", "t1"]  # newest first
        assert rows[1] == {
            "id": 1,
            "at": 10.0,
            "operation": "delegation-sent",
            "peer": "peer-b",
            "outcome": "ok",
            "detail": {"task": "t1"},
        }
        assert [r["outcome"] for r in log.rows(peer="peer-c")] == ["declined", "replayed"]
        assert len(log.rows(limit=1)) == 1
    # survives reopening
    with AuditLog(tmp_path / "audit.sqlite") as log:
        assert log.count() == 3


def test_update_and_delete_are_refused_by_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    with AuditLog(path) as log:
        log.record("consensus-result", peer=None, outcome="approved", detail={"id": "p1"})
    # a separate, plain connection: the refusal lives in the database, not in our class
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET outcome = 'rejected'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")
        conn.rollback()
        assert conn.execute("SELECT outcome FROM audit").fetchall() == [("approved",)]
    finally:
        conn.close()


def test_detail_is_bounded_with_a_note(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.sqlite", max_detail_bytes=512) as log:
        log.record("knowledge-query", peer=None, outcome="ok", detail={"q": "é\x01" * 5000})
        detail = log.rows()[0]["detail"]
        assert detail["truncated"] is True
        assert detail["original_bytes"] > 512
        assert detail["preview"].startswith('{"q": "é')
        conn = sqlite3.connect(tmp_path / "audit.sqlite")
        (stored,) = conn.execute("SELECT detail FROM audit").fetchone()
        conn.close()
        assert len(stored.encode()) <= 512
        assert json.loads(stored)["truncated"] is True


def test_bad_records_get_clear_errors(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.sqlite") as log:
        for kwargs, reason in (
            ({"operation": "Drop Table"}, "bad-operation"),
            ({"operation": "ballot-cast", "outcome": ""}, "bad-outcome"),
            ({"operation": "ballot-cast", "peer": "x" * 500}, "bad-peer"),
        ):
            args: dict[str, Any] = {"peer": None, "outcome": "ok", "detail": {}} | kwargs
            with pytest.raises(AuditError) as exc:
                log.record(**args)
            assert exc.value.reason == reason
        assert log.count() == 0
        # every operation the integrator uses is a valid name
        for op in sorted(KNOWN_OPERATIONS):
            log.record(op, peer=None, outcome="ok")
        assert log.count() == len(KNOWN_OPERATIONS)


def test_batched_rows_are_read_back_at_once_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(300):  # more than one batch
        log.record_quietly("delegation-sent", peer=None, outcome="completed", detail={"i": i})
    log.record_quietly("Not A Name", peer=None, outcome="x", detail={})  # refused, not raised
    assert log.count("delegation-sent") == 300
    assert log.rows("delegation-sent", limit=1)[0]["detail"] == {"i": 299}
    log.record_quietly("knowledge-query", peer=None, outcome="answered", detail={})
    log.close()  # flushes what is still batched
    reopened = AuditLog(path)
    assert reopened.count() == 301
    reopened.close()
