"""Append-only audit log of swarm operations on SQLite.

SQLite itself refuses UPDATE and DELETE on the log (triggers raise), so a bug or a
careless query cannot rewrite history through this connection or any other. Every
swarm operation is recorded; ``KNOWN_OPERATIONS`` lists them.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from swarm_notebook.errors import AuditError
from swarm_notebook.reasons import Reason

KNOWN_OPERATIONS = frozenset(
    {
        "delegation-sent",
        "delegation-received",
        "reflection-shared",
        "reflection-integrated",
        "reflection-rejected",
        "proposal-created",
        "ballot-cast",
        "ballot-received",
        "consensus-result",
        "knowledge-query",
    }
)
MAX_DETAIL_BYTES = 4096
MAX_ROWS_PER_QUERY = 10_000
log = logging.getLogger(__name__)
_INSERT = "INSERT INTO audit (at, operation, peer, outcome, detail) VALUES (?,?,?,?,?)"
BATCH_ROWS = 256
BATCH_SECONDS = 0.2
_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")
_MAX_PEER = 128
_MAX_OUTCOME = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    operation TEXT NOT NULL,
    peer TEXT,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_operation ON audit (operation, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
"""


def bounded_detail(detail: dict[str, Any], max_bytes: int = MAX_DETAIL_BYTES) -> str:
    """JSON text of ``detail``; when longer than ``max_bytes`` it is replaced by a note
    with the original size and a prefix of the JSON, so truncation is never silent."""
    text = json.dumps(detail, default=repr, sort_keys=True, ensure_ascii=False)
    size = len(text.encode())
    if size <= max_bytes:
        return text
    note: dict[str, Any] = {"truncated": True, "original_bytes": size, "preview": ""}
    budget = max_bytes - len(json.dumps(note).encode()) - 16
    preview = text.encode()[: max(0, budget)].decode(errors="ignore")
    # JSON escaping can grow the preview; shrink until the note fits.
    while True:
        note["preview"] = preview
        out = json.dumps(note, ensure_ascii=False)
        if not preview or len(out.encode()) <= max_bytes:
            return out
        preview = preview[: len(preview) * 9 // 10]


class AuditLog:
    """Append-only operations log in one SQLite file (WAL; one lock-guarded connection).

    >>> import tempfile, pathlib
    >>> log = AuditLog(pathlib.Path(tempfile.mkdtemp()) / "audit.sqlite")
    >>> log.record("knowledge-query", peer=None, outcome="ok", detail={"query": "parquet"})
    1
    >>> log.rows()[0]["detail"]
    {'query': 'parquet'}
    >>> log.close()
    """

    def __init__(self, path: Path | str, *, max_detail_bytes: int = MAX_DETAIL_BYTES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._max_detail = max_detail_bytes
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._pending: list[tuple[float, str, str | None, str, str]] = []
        self._pending_since = 0.0

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _row(
        self,
        operation: str,
        peer: str | None,
        outcome: str,
        detail: dict[str, Any] | None,
        now: float | None,
    ) -> tuple[float, str, str | None, str, str]:
        if not isinstance(operation, str) or not _NAME.fullmatch(operation):
            raise AuditError(
                Reason.BAD_OPERATION, f"{operation!r:.80} is not a lower-case-dashed name"
            )
        if peer is not None and (not isinstance(peer, str) or len(peer) > _MAX_PEER):
            raise AuditError(Reason.BAD_PEER, f"peer must be a string of at most {_MAX_PEER} chars")
        if not isinstance(outcome, str) or not outcome or len(outcome) > _MAX_OUTCOME:
            raise AuditError(Reason.BAD_OUTCOME, f"outcome must be 1..{_MAX_OUTCOME} characters")
        text = bounded_detail(detail or {}, self._max_detail)
        return (time.time() if now is None else now, operation, peer, outcome, text)

    def record(
        self,
        operation: str,
        *,
        peer: str | None,
        outcome: str,
        detail: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> int:
        """Append one entry; returns its id. ``detail`` is stored as bounded JSON."""
        row = self._row(operation, peer, outcome, detail, now)
        with self._lock:
            self._flush_locked()
            cursor = self._conn.execute(_INSERT, row)
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def record_quietly(
        self, operation: str, *, peer: str | None, outcome: str, detail: dict[str, Any]
    ) -> None:
        """Append an entry from a message handler: batched, and never raising.

        A failure is logged, never raised, because the audit log must not take a handler
        (and so the peer) down with it. Entries are written in one transaction per batch
        (``BATCH_ROWS`` rows or ``BATCH_SECONDS``): one commit per task cost more than
        the task at a thousand tasks a second. Reads and ``close`` flush first.
        """
        try:
            row = self._row(operation, peer, outcome[:_MAX_OUTCOME], detail, None)
        except Exception:
            log.exception("audit %s refused", operation)
            return
        with self._lock:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(row)
            due = (
                len(self._pending) >= BATCH_ROWS
                or time.monotonic() - self._pending_since >= BATCH_SECONDS
            )
            if due:
                self._flush_locked()

    def flush(self) -> None:
        """Write batched entries now."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            self._conn.execute("BEGIN")
            self._conn.executemany(_INSERT, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            log.exception("audit: %d entries could not be written", len(rows))
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def rows(
        self, operation: str | None = None, *, peer: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Entries, newest first: ``id, at, operation, peer, outcome, detail`` (a dict)."""
        limit = max(1, min(int(limit), MAX_ROWS_PER_QUERY))
        clauses, params = [], []
        if operation is not None:
            clauses.append("operation = ?")
            params.append(operation)
        if peer is not None:
            clauses.append("peer = ?")
            params.append(peer)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            self._flush_locked()
            fetched = self._conn.execute(
                f"SELECT id, at, operation, peer, outcome, detail FROM audit {where} "
                "ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [
            {
                "id": rid,
                "at": at,
                "operation": op,
                "peer": who,
                "outcome": outcome,
                "detail": json.loads(detail),
            }
            for rid, at, op, who, outcome, detail in fetched
        ]

    def count(self, operation: str | None = None) -> int:
        with self._lock:
            self._flush_locked()
            if operation is None:
                (n,) = self._conn.execute("SELECT count(*) FROM audit").fetchone()
            else:
                (n,) = self._conn.execute(
                    "SELECT count(*) FROM audit WHERE operation = ?", (operation,)
                ).fetchone()
        return int(n)
