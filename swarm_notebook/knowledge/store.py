"""Persistent reflection store on SQLite (WAL), searched with FTS5 when available.

One connection, guarded by a lock, so the coordinator's event-loop thread and a
notebook thread may both use it. Reflections are stored as data only (JSON text for
lists); nothing read back is executed or evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.knowledge.ranking import (
    keyword_score,
    query_terms,
)
from swarm_notebook.knowledge.reflections import (
    DEFAULT_LIMITS,
    PROVENANCE_TAG_PREFIX,
    Reflection,
    ReflectionLimits,
    content_hash,
    reflection_to_dict,
    validate_reflection,
)
from swarm_notebook.reasons import Reason

Source = Literal["local", "swarm"]
MAX_SEARCH_LIMIT = 200
_CANDIDATES_PER_RESULT = 8
_SHARED_FROM = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reflections (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL UNIQUE,
    category TEXT NOT NULL,
    description TEXT NOT NULL,
    outcome TEXT NOT NULL,
    recommendations TEXT NOT NULL,
    tags TEXT NOT NULL,
    content_tags TEXT NOT NULL,
    author TEXT NOT NULL,
    timestamp REAL NOT NULL,
    signature TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('local', 'swarm')),
    shared_from TEXT,
    stored_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reflections_source ON reflections (source);
"""

_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS reflections_fts USING fts5 (
    category, description, recommendations, tags,
    content='reflections', content_rowid='id'
);
CREATE TRIGGER IF NOT EXISTS reflections_fts_insert AFTER INSERT ON reflections BEGIN
    INSERT INTO reflections_fts (rowid, category, description, recommendations, tags)
    VALUES (new.id, new.category, new.description, new.recommendations, new.tags);
END;
"""

_COLUMNS = (
    "id, content_hash, category, description, outcome, recommendations, tags, "
    "content_tags, author, timestamp, signature, source, shared_from, stored_at"
)


def fts5_available() -> bool:
    """True when this Python's SQLite was built with FTS5."""
    with sqlite3.connect(":memory:") as conn:
        try:
            conn.execute("CREATE VIRTUAL TABLE probe USING fts5 (x)")
        except sqlite3.OperationalError:
            return False
    return True


@dataclass(frozen=True)
class StoredReflection:
    """A reflection as stored: the (signed) reflection plus local bookkeeping.

    ``tags`` are the stored tags: the author's tags plus ``shared_from_<peer>`` for
    reflections received from the swarm; ``reflection.tags`` are the signed ones.
    ``score`` is the number of distinct query keywords matched (search results only).
    """

    id: int
    content_hash: str
    reflection: Reflection
    tags: tuple[str, ...]
    source: Source
    shared_from: str | None
    stored_at: float
    score: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The signed reflection's fields plus ``id``, ``content_hash``, ``source``,
        ``shared_from``, ``stored_tags``, ``stored_at`` (what peers get when they ask)."""
        out = reflection_to_dict(self.reflection)
        out.update(
            id=self.id,
            content_hash=self.content_hash,
            source=self.source,
            shared_from=self.shared_from,
            stored_tags=list(self.tags),
            stored_at=self.stored_at,
        )
        if self.score is not None:
            out["score"] = self.score
        return out


class ReflectionStore:
    """Reflections in one SQLite file, de-duplicated by content hash.

    ``full_text``: ``None`` uses FTS5 when SQLite has it (else ``LIKE``); ``False`` forces
    ``LIKE``. ``search_backend`` says which one is used. ``max_swarm_reflections`` caps
    what peers can make us store; the user's own reflections are never refused for space.

    >>> import tempfile, pathlib
    >>> store = ReflectionStore(pathlib.Path(tempfile.mkdtemp()) / "r.sqlite")
    >>> store.add_reflection(Reflection("io", "parquet beats csv", "successful"))
    (1, True)
    >>> [r.reflection.description for r in store.search_reflections(["parquet"])]
    ['parquet beats csv']
    >>> store.close()
    """

    def __init__(
        self,
        path: Path | str,
        *,
        full_text: bool | None = None,
        max_swarm_reflections: int = 100_000,
        limits: ReflectionLimits = DEFAULT_LIMITS,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._limits = limits
        self._max_swarm = max_swarm_reflections
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        use_fts = fts5_available() if full_text is None else full_text and fts5_available()
        if use_fts:
            self._conn.executescript(_FTS_SCHEMA)
            self._backfill_fts()
        self.search_backend: Literal["fts5", "like"] = "fts5" if use_fts else "like"

    def _backfill_fts(self) -> None:
        # A file first written without FTS has rows the index never saw.
        (indexed,) = self._conn.execute("SELECT count(*) FROM reflections_fts_docsize").fetchone()
        (stored,) = self._conn.execute("SELECT count(*) FROM reflections").fetchone()
        if indexed != stored:
            self._conn.execute("INSERT INTO reflections_fts (reflections_fts) VALUES ('rebuild')")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ReflectionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_reflection(
        self,
        reflection: Reflection | dict[str, Any],
        *,
        source: Source = "local",
        shared_from: str | None = None,
        now: float | None = None,
    ) -> tuple[int, bool]:
        """Store a reflection; returns ``(id, created)``; ``created`` is False for a duplicate.

        With ``shared_from`` (the peer it came from) the entry is tagged
        ``shared_from_<peer>`` and its source is ``"swarm"``, as the blueprint's
        ``integrateSharedReflection`` does. Raises ``ReflectionRejected`` for a malformed
        reflection or (``store-full``) when the swarm share of the store is full.
        """
        checked = validate_reflection(reflection, limits=self._limits)
        tags = list(checked.tags)
        if shared_from is not None:
            if not _SHARED_FROM.fullmatch(shared_from):
                raise ReflectionRejected(Reason.WRONG_SCHEMA, "shared_from is not a peer id")
            source = "swarm"
            tags.append(f"{PROVENANCE_TAG_PREFIX}{shared_from}")
        if source not in ("local", "swarm"):
            raise ReflectionRejected(Reason.WRONG_SCHEMA, f"source {source!r} is not local/swarm")
        digest = content_hash(checked)
        row = (
            digest,
            checked.category,
            checked.description,
            checked.outcome,
            json.dumps(list(checked.recommendations)),
            json.dumps(tags),
            json.dumps(list(checked.tags)),
            checked.author,
            checked.timestamp,
            checked.signature,
            source,
            shared_from,
            time.time() if now is None else now,
        )
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                existing = self._conn.execute(
                    "SELECT id FROM reflections WHERE content_hash = ?", (digest,)
                ).fetchone()
                if existing is not None:
                    self._conn.execute("COMMIT")
                    return int(existing[0]), False
                if source == "swarm":
                    (swarm_rows,) = self._conn.execute(
                        "SELECT count(*) FROM reflections WHERE source = 'swarm'"
                    ).fetchone()
                    if swarm_rows >= self._max_swarm:
                        raise ReflectionRejected(
                            Reason.STORE_FULL, f"{swarm_rows} swarm reflections stored (limit)"
                        )
                cursor = self._conn.execute(
                    "INSERT INTO reflections (content_hash, category, description, outcome, "
                    "recommendations, tags, content_tags, author, timestamp, signature, "
                    "source, shared_from, stored_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        assert cursor.lastrowid is not None
        return cursor.lastrowid, True

    def has_content_hash(self, digest: str) -> bool:
        """True when a reflection with this content hash is stored (replay check)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM reflections WHERE content_hash = ?", (digest,)
            ).fetchone()
        return row is not None

    def get(self, reflection_id: int) -> StoredReflection | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM reflections WHERE id = ?", (reflection_id,)
            ).fetchone()
        return None if row is None else _from_row(row)

    def recent(self, limit: int = 20) -> list[StoredReflection]:
        """Newest first."""
        limit = _clamp(limit)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM reflections ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_from_row(r) for r in rows]

    def count(self, source: Source | None = None) -> int:
        with self._lock:
            if source is None:
                (n,) = self._conn.execute("SELECT count(*) FROM reflections").fetchone()
            else:
                (n,) = self._conn.execute(
                    "SELECT count(*) FROM reflections WHERE source = ?", (source,)
                ).fetchone()
        return int(n)

    def search_reflections(
        self, keywords: Iterable[str] | str, limit: int = 5
    ) -> list[StoredReflection]:
        """Reflections matching any keyword (word-prefix match), best first.

        Ranked by the number of distinct keywords matched, then by occurrences, then
        newest. An empty query returns the most recent reflections.

        >>> # store.search_reflections(["pandas", "merge"], limit=5)
        """
        terms = query_terms(keywords if isinstance(keywords, str) else list(keywords))
        limit = _clamp(limit)
        if not terms:
            return self.recent(limit)
        candidates = limit * _CANDIDATES_PER_RESULT
        with self._lock:
            if self.search_backend == "fts5":
                match = " OR ".join(f'"{t}"*' for t in terms)
                rows = self._conn.execute(
                    f"SELECT {', '.join('r.' + c for c in _COLUMNS.split(', '))} "
                    "FROM reflections_fts JOIN reflections r ON r.id = reflections_fts.rowid "
                    "WHERE reflections_fts MATCH ? ORDER BY bm25(reflections_fts) LIMIT ?",
                    (match, candidates),
                ).fetchall()
            else:
                text = "(category || ' ' || description || ' ' || recommendations || ' ' || tags)"
                where = " OR ".join(f"{text} LIKE ? ESCAPE '\\'" for _ in terms)
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM reflections WHERE {where} ORDER BY id DESC LIMIT ?",
                    (*(f"%{_escape_like(t)}%" for t in terms), candidates),
                ).fetchall()
        scored = []
        for row in rows:
            stored = _from_row(row)
            r = stored.reflection
            text = " ".join([r.category, r.description, *r.recommendations, *stored.tags])
            score = keyword_score(terms, text)
            if score[0]:
                scored.append((score, stored))
        scored.sort(key=lambda pair: (pair[0], pair[1].id), reverse=True)
        return [_with_score(stored, score[0]) for score, stored in scored[:limit]]


def _clamp(limit: int) -> int:
    return max(1, min(int(limit), MAX_SEARCH_LIMIT))


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _with_score(stored: StoredReflection, score: int) -> StoredReflection:
    return dataclasses.replace(stored, score=score)


def _from_row(row: tuple[Any, ...]) -> StoredReflection:
    (
        rid,
        digest,
        category,
        description,
        outcome,
        recommendations,
        tags,
        content_tags,
        author,
        timestamp,
        signature,
        source,
        shared_from,
        stored_at,
    ) = row
    reflection = Reflection(
        category=category,
        description=description,
        outcome=outcome,
        recommendations=tuple(json.loads(recommendations)),
        tags=tuple(json.loads(content_tags)),
        author=author,
        timestamp=timestamp,
        signature=signature,
    )
    return StoredReflection(
        id=int(rid),
        content_hash=digest,
        reflection=reflection,
        tags=tuple(json.loads(tags)),
        source=source,
        shared_from=shared_from,
        stored_at=stored_at,
    )
