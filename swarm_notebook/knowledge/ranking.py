"""Merging knowledge answers from the local store and from peers.

The local hits and every peer's answer are validated, de-duplicated by content hash,
attributed to everyone who returned them, and ranked: reflections whose author's signature
verifies always come before unverified ones (a forged author must never rank first), then
by how many query keywords they match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.knowledge.reflections import (
    DEFAULT_LIMITS,
    Reflection,
    ReflectionLimits,
    content_hash,
    reflection_to_dict,
    validate_reflection,
    verify_reflection,
)
from swarm_notebook.reasons import Reason

LOCAL = "local"
MAX_TERMS = 16
MAX_TERM_LENGTH = 64
_WORD = re.compile(r"\w+")
_REFLECTION_FIELDS = frozenset(Reflection.__struct_fields__)


def query_terms(query: str | Iterable[str], max_terms: int = MAX_TERMS) -> list[str]:
    """Lower-case word tokens of a query, de-duplicated, at most ``max_terms``.

    >>> query_terms("Pandas merge, pandas JOIN")
    ['pandas', 'merge', 'join']
    """
    text = query if isinstance(query, str) else " ".join(str(q) for q in query)
    terms: list[str] = []
    for word in _WORD.findall(text.lower()):
        word = word[:MAX_TERM_LENGTH]
        if word not in terms:
            terms.append(word)
        if len(terms) >= max_terms:
            break
    return terms


def keyword_score(terms: list[str], text: str) -> tuple[int, int]:
    """(distinct terms matched, word occurrences matched); a term matches a word prefix."""
    words = _WORD.findall(text.lower())
    distinct = sum(1 for t in terms if any(w.startswith(t) for w in words))
    occurrences = sum(1 for w in words if any(w.startswith(t) for t in terms))
    return distinct, occurrences


def reflection_text(reflection: Reflection) -> str:
    """Searchable text of a reflection (what the keyword score looks at)."""
    return " ".join(
        [
            reflection.category,
            reflection.description,
            *reflection.recommendations,
            *reflection.tags,
        ]
    )


@dataclass
class KnowledgeMerge:
    """Ranked items, plus every input item that was refused (``from_peer``, ``reason``)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _Entry:
    reflection: Reflection
    digest: str
    sources: list[str]
    verified: bool
    score: tuple[int, int]


def _parse_item(item: Any, limits: ReflectionLimits) -> Reflection:
    if not isinstance(item, Mapping):
        raise ReflectionRejected(
            Reason.WRONG_SCHEMA, f"item is a {type(item).__name__}, not a dict"
        )
    # Answers may carry store extras (id, source, score...): only the reflection counts.
    fields = {k: v for k, v in item.items() if k in _REFLECTION_FIELDS}
    return validate_reflection(fields, limits=limits, allow_provenance_tags=True)


def merge_knowledge_detailed(
    local: Iterable[Any],
    remote: Mapping[str, Iterable[Any]],
    query: str | Iterable[str],
    *,
    limit: int | None = None,
    max_items_per_source: int = 50,
    limits: ReflectionLimits = DEFAULT_LIMITS,
) -> KnowledgeMerge:
    """Like ``merge_knowledge`` but also reports refused items instead of dropping them."""
    terms = query_terms(query)
    merged = KnowledgeMerge()
    entries: dict[str, _Entry] = {}
    sources: list[tuple[str, Iterable[Any]]] = [(LOCAL, local), *remote.items()]
    for source, items in sources:
        for position, item in enumerate(items):
            if position >= max_items_per_source:
                merged.rejected.append(
                    {
                        "from_peer": source,
                        "reason": "too-many-items",
                        "message": f"more than {max_items_per_source} items from one source",
                    }
                )
                break
            try:
                reflection = _parse_item(item, limits)
            except ReflectionRejected as exc:
                merged.rejected.append(
                    {"from_peer": source, "reason": exc.reason, "message": exc.message}
                )
                continue
            digest = content_hash(reflection)
            entry = entries.get(digest)
            if entry is None:
                entries[digest] = _Entry(
                    reflection=reflection,
                    digest=digest,
                    sources=[source],
                    verified=verify_reflection(reflection),
                    score=keyword_score(terms, reflection_text(reflection)),
                )
            elif source not in entry.sources:
                entry.sources.append(source)
    ranked = sorted(
        entries.values(),
        key=lambda e: (e.verified, e.score, len(e.sources), e.reflection.timestamp),
        reverse=True,
    )
    if limit is not None:
        ranked = ranked[: max(0, limit)]
    for entry in ranked:
        out = reflection_to_dict(entry.reflection)
        out.update(
            content_hash=entry.digest,
            from_peer=list(entry.sources),
            verified=entry.verified,
            score=entry.score[0],
        )
        merged.items.append(out)
    return merged


def merge_knowledge(
    local: Iterable[Any],
    remote: Mapping[str, Iterable[Any]],
    query: str | Iterable[str],
    *,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Merge local hits and peers' answers into one ranked, de-duplicated list.

    Each item is a reflection dict plus ``content_hash``, ``from_peer`` (list: ``"local"``
    and/or peer ids that returned it), ``verified`` (its author's signature checks out)
    and ``score`` (distinct query keywords matched). Verified items come first, whatever
    their score; then the score; ties go to items more sources agree on, then to newer
    ones. Malformed items are skipped; use
    ``merge_knowledge_detailed`` to see them.

    >>> merge_knowledge([{"category": "io", "description": "read_parquet is fast",
    ...                   "outcome": "successful"}], {}, "parquet")[0]["from_peer"]
    ['local']
    """
    return merge_knowledge_detailed(local, remote, query, limit=limit).items
