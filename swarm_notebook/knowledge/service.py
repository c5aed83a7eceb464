"""Knowledge on the swarm: sharing successful reflections, admitting peers' ones, and
answering / asking ``query_knowledge`` (the network half; ranking is in ``ranking``).

Wire messages (all bodies schema-checked):

* ``reflection-share`` (one-way): ``{"reflection": <msgpack bytes of a signed Reflection>}``;
  admitted only through the ``SharedReflectionGate`` (rate, schema, size, outcome,
  freshness, signature, author == sender, replay).
* ``knowledge-request`` (request): ``{"query": str, "limit": int}`` answered with
  ``{"reflections": [...], "artifacts": [...]}``, each list capped at
  ``MAX_ANSWER_ITEMS``; rate-limited per asking peer.

Nothing in a reflection or a query is ever executed; artifacts are file *names* under the
workspace folder, never file contents. An artifact path from a peer is kept only if it is
a plain relative path (no ``..``, not absolute, no drive, no ``~``, no control
characters); the local scan never follows a symlink.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from swarm_notebook._util.ratelimit import TokenBuckets
from swarm_notebook._util.tasks import OwnedTasks
from swarm_notebook.errors import (
    HandlerRefusal,
    NotJoinedError,
    PeerUnavailable,
    ReflectionRejected,
    RemoteError,
    RequestTimeout,
    UsageError,
)
from swarm_notebook.knowledge import (
    GateConfig,
    Reflection,
    ReflectionStore,
    SharedReflectionGate,
    content_hash,
    encode_reflection,
    merge_knowledge_detailed,
    query_terms,
    sign_reflection,
)
from swarm_notebook.knowledge.ranking import LOCAL, keyword_score
from swarm_notebook.knowledge.reflections import SUCCESSFUL
from swarm_notebook.ledger.audit import AuditLog
from swarm_notebook.ledger.stats import CoordinationStats
from swarm_notebook.membership.node import SwarmNode
from swarm_notebook.reasons import Reason

log = logging.getLogger(__name__)

REFLECTION_SHARE = "reflection-share"
KNOWLEDGE_REQUEST = "knowledge-request"

MAX_QUERY_LENGTH = 1000
MAX_ANSWER_ITEMS = 50
MAX_ARTIFACT_PATH = 512
MAX_ARTIFACT_TYPE = 32
# Bounds of the workspace walk: a huge folder costs at most this much per query.
MAX_SCANNED_ENTRIES = 5000
MAX_SCAN_DEPTH = 6
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "venv", "env"})
_DRAFT_FIELDS = ("category", "description", "outcome", "recommendations", "tags")
_IGNORED_FIELDS = frozenset(
    {"author", "timestamp", "signature", "id", "content_hash", "source", "shared_from"}
)

Notify = Callable[[str, dict[str, Any]], None]


@dataclass
class KnowledgeConfig:
    peer_timeout_s: float = 3.0
    limit: int = 10


class ReflectionShare(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``reflection-share``: the signed reflection's msgpack bytes (the gate
    measures their size before decoding)."""

    reflection: bytes


class KnowledgeRequest(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(max_length=MAX_QUERY_LENGTH)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_ANSWER_ITEMS)] = 10


class Artifact(msgspec.Struct, forbid_unknown_fields=True):
    """A workspace file a peer knows of: its relative path and type (the suffix)."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ARTIFACT_PATH)]
    type: Annotated[str, msgspec.Meta(max_length=MAX_ARTIFACT_TYPE)]


class KnowledgeAnswer(msgspec.Struct):
    reflections: Annotated[list[Any], msgspec.Meta(max_length=MAX_ANSWER_ITEMS)] = []
    artifacts: Annotated[list[Artifact], msgspec.Meta(max_length=MAX_ANSWER_ITEMS)] = []


def scan_artifacts(workspace: Path, query: str, limit: int) -> list[dict[str, str]]:
    """Files under ``workspace`` whose relative path matches a query keyword, best first.

    Bounded: at most ``MAX_SCANNED_ENTRIES`` directory entries, ``MAX_SCAN_DEPTH`` levels;
    hidden entries and caches are skipped and symlinks are not followed. Returns
    ``{"path", "type"}`` dicts; file contents are never read.

    >>> import tempfile, pathlib
    >>> ws = pathlib.Path(tempfile.mkdtemp()); (ws / "sales_report.parquet").touch()
    >>> scan_artifacts(ws, "sales", 5)
    [{'path': 'sales_report.parquet', 'type': 'parquet'}]
    """
    terms = query_terms(query)
    if not terms or limit <= 0:
        return []
    scored: list[tuple[tuple[int, int], str, str]] = []
    scanned = 0
    stack: list[tuple[Path, int]] = [(workspace, 0)]
    while stack and scanned < MAX_SCANNED_ENTRIES:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            scanned += 1
            if scanned > MAX_SCANNED_ENTRIES:
                break
            if entry.name.startswith(".") or entry.name in _SKIPPED_DIRS:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 < MAX_SCAN_DEPTH:
                        stack.append((Path(entry.path), depth + 1))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            relative = Path(entry.path).relative_to(workspace).as_posix()
            if len(relative) > MAX_ARTIFACT_PATH:
                continue
            score = keyword_score(terms, relative.replace("/", " ").replace(".", " "))
            if score[0]:
                kind = Path(entry.name).suffix.lstrip(".").lower()[:MAX_ARTIFACT_TYPE] or "file"
                scored.append((score, relative, kind))
    scored.sort(key=lambda item: (-item[0][0], -item[0][1], item[1]))
    return [{"path": path, "type": kind} for _, path, kind in scored[:limit]]


def artifact_path_problem(path: str) -> str | None:
    """Why ``path`` is not a plain path relative to a workspace, or ``None`` if it is.

    >>> artifact_path_problem("data/sales.csv") is None, artifact_path_problem("../../etc/passwd")
    (True, 'climbs out with ..')
    """
    if not path or any(ord(c) < 32 or c == "\x7f" for c in path):
        return "empty or with control characters"
    if "\\" in path:
        return "has a backslash"
    if path.startswith(("/", "~")) or (len(path) > 1 and path[1] == ":"):
        return "is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "climbs out with .."
    if posixpath.normpath(path) != path or "." in parts:
        return "is not a normal relative path"
    return None


def _draft_fields(reflection: Mapping[str, Any] | Reflection) -> dict[str, Any]:
    """The content fields of a user-supplied reflection (authorship is ours to set)."""
    if isinstance(reflection, Reflection):
        return {name: getattr(reflection, name) for name in _DRAFT_FIELDS}
    if not isinstance(reflection, Mapping):
        raise ReflectionRejected(
            Reason.WRONG_SCHEMA, f"a reflection is a dict, not a {type(reflection).__name__}"
        )
    unknown = sorted(set(reflection) - set(_DRAFT_FIELDS) - _IGNORED_FIELDS)
    if unknown:
        raise ReflectionRejected(Reason.WRONG_SCHEMA, f"unknown fields: {', '.join(unknown)[:200]}")
    fields = {name: reflection[name] for name in _DRAFT_FIELDS if name in reflection}
    for required in ("description", "outcome"):
        if not isinstance(fields.get(required), str):
            raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{required} (a string) is required")
    fields.setdefault("category", "general")
    for name in ("recommendations", "tags"):
        value = fields.get(name, ())
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{name} must be a list of strings")
        items = list(value)
        if not all(isinstance(item, str) for item in items):
            raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{name} must be a list of strings")
        fields[name] = items
    if not isinstance(fields["category"], str):
        raise ReflectionRejected(Reason.WRONG_SCHEMA, "category must be a string")
    return fields


class KnowledgeService:
    """Shares, admits and finds reflections for one swarm node.

    The store and the audit log belong to the caller (they outlive this service);
    ``close`` only stops this service's own work and unregisters its handlers.

    >>> await knowledge.share_success_pattern({"category": "pandas",
    ...     "description": "merge(validate='one_to_one') catches duplicate keys",
    ...     "outcome": "successful"})                                   # doctest: +SKIP
    2
    """

    def __init__(
        self,
        *,
        node: SwarmNode,
        store: ReflectionStore,
        audit: AuditLog,
        stats: CoordinationStats,
        notify: Notify,
        settings: KnowledgeConfig,
        workspace: Path | None,
        is_initialized: Callable[[], bool],
        gate_config: GateConfig | None = None,
        request_rate_per_s: float = 5.0,
        request_burst: float = 20.0,
        audit_rejections_per_s: float = 1.0,
        audit_rejections_burst: float = 20.0,
    ) -> None:
        self.node = node
        self.store = store
        self.audit = audit
        self.stats = stats
        self.settings = settings
        self.workspace = workspace
        self._notify = notify
        self._is_initialized = is_initialized
        self.gate = SharedReflectionGate(gate_config, is_known=store.has_content_hash)
        self._request_rate = TokenBuckets(request_rate_per_s, request_burst, 1024)
        # A peer flooding bad reflections must not flood the audit log: beyond this rate
        # its rejections are still counted (gate.rejections), just not each written down.
        self._rejection_audit_rate = TokenBuckets(
            audit_rejections_per_s, audit_rejections_burst, 1024
        )
        self.rejections_not_audited = 0
        self.request_rejections: dict[str, int] = {}
        # Items refused from peers' answers (bad reflections, artifact paths), by reason.
        self.answer_rejections: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._tasks = OwnedTasks("knowledge-service")
        self._closed = False
        node.endpoint.register_message_handler(
            REFLECTION_SHARE, self._on_reflection_share, schema=ReflectionShare
        )
        node.endpoint.register_message_handler(
            KNOWLEDGE_REQUEST, self._on_knowledge_request, schema=KnowledgeRequest
        )

    # -- helpers -----------------------------------------------------------------------

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        try:
            self._notify(event, payload)
        except Exception:
            log.exception("notify %s failed", event)

    def _sign(self, reflection: Mapping[str, Any] | Reflection) -> Reflection:
        return sign_reflection(self.node.identity, **_draft_fields(reflection))

    # -- sharing -----------------------------------------------------------------------

    async def share_success_pattern(self, reflection: dict[str, Any]) -> int:
        """Sign ``reflection`` as ours, keep it locally and send it to every connected peer.

        Returns the number of peers reached. Only ``outcome == "successful"`` is shared;
        anything else, or a swarm that is not initialised, is stored locally and reaches 0
        peers. Malformed input raises ``ReflectionRejected``.

        >>> await coordinator.share_success_pattern({"category": "io",
        ...     "description": "read_parquet(columns=[...]) reads only what you need",
        ...     "outcome": "successful", "tags": ["parquet"]})          # doctest: +SKIP
        3
        """
        signed = self._sign(reflection)
        digest = content_hash(signed)
        self.store.add_reflection(signed, source="local")
        detail = {"content_hash": digest, "category": signed.category}
        if signed.outcome != SUCCESSFUL or not self._is_initialized():
            why = "not-successful" if signed.outcome != SUCCESSFUL else "not-initialized"
            self.audit.record_quietly(
                "reflection-shared", peer=None, outcome=f"skipped:{why}", detail=detail
            )
            return 0
        body = {"reflection": encode_reflection(signed)}
        reached = await self.node.endpoint.broadcast(REFLECTION_SHARE, body)
        if reached:
            self.stats.patterns_shared += 1
            self.stats.touch("reflection-shared")
        self.audit.record_quietly(
            "reflection-shared", peer=None, outcome="sent", detail={**detail, "count": reached}
        )
        self._emit(
            "swarm:reflection-shared",
            {"count": reached, "content_hash": digest, "reflection": msgspec.to_builtins(signed)},
        )
        return reached

    async def add_reflection(self, reflection: dict[str, Any]) -> dict[str, Any]:
        """Sign and store a reflection locally without sharing it; returns the stored row."""
        signed = self._sign(reflection)
        row_id, _created = self.store.add_reflection(signed, source="local")
        stored = self.store.get(row_id)
        assert stored is not None
        return stored.to_dict()

    async def integrate_shared_reflection(self, peer_id: str, reflection: Any) -> dict[str, Any]:
        """Admit a reflection received from ``peer_id`` and store it tagged
        ``shared_from_<peer_id>`` with source ``swarm``; raises ``ReflectionRejected``."""
        try:
            checked = self.gate.check(peer_id, reflection, now=time.time())
            row_id, _created = self.store.add_reflection(checked, shared_from=peer_id)
        except ReflectionRejected as exc:
            self.stats.messages_rejected += 1
            if self._rejection_audit_rate.take(peer_id, time.monotonic()):
                self.audit.record_quietly(
                    "reflection-rejected",
                    peer=peer_id,
                    outcome=exc.reason,
                    detail={"message": exc.message[:300]},
                )
            else:
                self.rejections_not_audited += 1
            raise
        stored = self.store.get(row_id)
        assert stored is not None
        row = stored.to_dict()
        self.stats.reflections_integrated += 1
        self.stats.touch("reflection-integrated")
        self.audit.record_quietly(
            "reflection-integrated",
            peer=peer_id,
            outcome="stored",
            detail={"content_hash": stored.content_hash, "id": row_id},
        )
        self._emit("swarm:reflection-integrated", {"peer_id": peer_id, "reflection": row})
        return row

    async def _on_reflection_share(self, peer_id: str, body: ReflectionShare) -> None:
        if not self._is_initialized():
            raise HandlerRefusal(
                Reason.NOT_INITIALIZED, "this peer does not accept reflections yet"
            )
        try:
            await self.integrate_shared_reflection(peer_id, body.reflection)
        except ReflectionRejected as exc:
            raise HandlerRefusal(exc.reason, exc.message) from None

    # -- querying ----------------------------------------------------------------------

    def _local_answer(self, query: str, limit: int) -> list[dict[str, Any]]:
        return [stored.to_dict() for stored in self.store.search_reflections(query, limit)]

    async def _artifacts(self, query: str, limit: int) -> list[dict[str, str]]:
        if self.workspace is None:
            return []
        return await asyncio.to_thread(scan_artifacts, self.workspace, query, limit)

    def _refuse_request(self, reason: str, message: str) -> HandlerRefusal:
        self.request_rejections[reason] = self.request_rejections.get(reason, 0) + 1
        self.stats.messages_rejected += 1
        return HandlerRefusal(reason, message)

    async def _on_knowledge_request(self, peer_id: str, body: KnowledgeRequest) -> dict[str, Any]:
        if not self._is_initialized():
            raise self._refuse_request("not-initialized", "this peer does not answer yet")
        if not self._request_rate.take(peer_id, time.monotonic()):
            raise self._refuse_request("rate-limited", "too many knowledge requests")
        limit = min(body.limit, MAX_ANSWER_ITEMS)
        # Peers hear only successful lessons, as with sharing; failed ones stay local notes.
        candidates = self.store.search_reflections(body.query, limit * 4)
        successful = [s.to_dict() for s in candidates if s.reflection.outcome == SUCCESSFUL]
        return {
            "reflections": successful[:limit],
            "artifacts": await self._artifacts(body.query, limit),
        }

    async def _ask_peer(
        self, peer_id: str, query: str, limit: int, timeout: float
    ) -> tuple[str, KnowledgeAnswer | None]:
        try:
            reply = await self.node.endpoint.request(
                peer_id, KNOWLEDGE_REQUEST, {"query": query, "limit": limit}, timeout=timeout
            )
            return "answered", msgspec.convert(reply, KnowledgeAnswer)
        except RequestTimeout:
            return "timeout", None
        except RemoteError as exc:
            return f"error: {exc.reason}", None
        except PeerUnavailable:
            return "error: peer-unavailable", None
        except msgspec.ValidationError as exc:
            return f"error: wrong-schema: {str(exc)[:120]}", None

    async def query_knowledge(
        self, query: str, *, limit: int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ask the local store, the workspace and every connected peer; merge the answers.

        Returns ``{"reflections", "artifacts", "peers", "rejected"}``: reflections are
        de-duplicated by content hash and ranked, each with ``from_peer`` (``"local"``
        and/or the peers that returned it) and ``verified``; artifacts carry
        ``from_peer`` too; ``peers`` says per peer ``"answered"``, ``"timeout"`` or
        ``"error: <reason>"`` (a slow peer costs at most ``timeout`` and the others'
        answers are kept); ``rejected`` lists refused items with their reason.

        >>> found = await coordinator.query_knowledge("parquet pandas")  # doctest: +SKIP
        >>> [(r["description"], r["from_peer"]) for r in found["reflections"]]  # doctest: +SKIP
        """
        if self._closed:
            raise NotJoinedError("the knowledge service is closed", Reason.CLOSED)
        if not isinstance(query, str) or len(query) > MAX_QUERY_LENGTH:
            raise UsageError(
                Reason.BAD_ARGUMENTS,
                f"query must be a string of at most {MAX_QUERY_LENGTH} characters",
            )
        limit = self.settings.limit if limit is None else limit
        limit = max(1, min(int(limit), MAX_ANSWER_ITEMS))
        timeout = self.settings.peer_timeout_s if timeout is None else timeout
        self.stats.knowledge_queries += 1
        self.stats.touch("knowledge-query")
        peers = self.node.connected_peers() if self._is_initialized() else []
        asked = [
            self._tasks.spawn(self._ask_peer(peer, query, limit, timeout), name="knowledge-ask")
            for peer in peers
        ]
        try:
            local = self._local_answer(query, limit)
            local_artifacts = await self._artifacts(query, limit)
            answers = await asyncio.gather(*asked)
        finally:
            for task in asked:
                task.cancel()
        statuses = {peer: status for peer, (status, _) in zip(peers, answers, strict=True)}
        remote = {
            peer: answer.reflections
            for peer, (_, answer) in zip(peers, answers, strict=True)
            if answer is not None
        }
        merged = merge_knowledge_detailed(
            local, remote, query, limit=limit, max_items_per_source=MAX_ANSWER_ITEMS
        )
        peer_artifacts: list[tuple[str, list[dict[str, Any]]]] = []
        for peer, (_, answer) in zip(peers, answers, strict=True):
            if answer is None:
                continue
            kept = []
            for artifact in answer.artifacts:
                problem = artifact_path_problem(artifact.path)
                if problem is None:
                    kept.append(msgspec.to_builtins(artifact))
                else:
                    merged.rejected.append(
                        {
                            "from_peer": peer,
                            "reason": Reason.PATH_OUTSIDE_WORKSPACE,
                            "message": f"artifact path {artifact.path!r:.80} {problem}",
                        }
                    )
            peer_artifacts.append((peer, kept))
        artifacts = _merge_artifacts(query, [(LOCAL, local_artifacts), *peer_artifacts], limit)
        for item in merged.rejected:
            self._count_answer_rejection(item["from_peer"], item["reason"], item["message"])
        self.audit.record_quietly(
            "knowledge-query",
            peer=None,
            outcome="partial" if any(s != "answered" for s in statuses.values()) else "ok",
            detail={
                "query": query[:200],
                "peers": statuses,
                "reflections": len(merged.items),
                "artifacts": len(artifacts),
                "rejected": len(merged.rejected),
            },
        )
        # Names from signed agent cards, so people read "alice/analysis", not a key.
        named: list[dict[str, Any]] = [
            {**item, "from_peer_name": self._peer_name(item.get("from_peer"))}
            for item in (*merged.items, *artifacts)
        ]
        return {
            "reflections": named[: len(merged.items)],
            "artifacts": named[len(merged.items) :],
            "peers": statuses,
            "rejected": merged.rejected,
        }

    def _peer_name(self, peer: Any) -> Any:
        """The card name of ``from_peer`` (a list of them when it is a list)."""
        if isinstance(peer, list):
            return [self._peer_name(p) for p in peer]
        if peer == LOCAL:
            return self.node.name
        view = self.node.peer(peer) if isinstance(peer, str) else None
        return view.card.name if view is not None and view.card is not None else None

    def _count_answer_rejection(self, peer: str, reason: str, message: str) -> None:
        self.answer_rejections[reason] += 1
        if (peer, reason) not in self._logged and len(self._logged) < 4096:
            self._logged.add((peer, reason))
            log.info("refused an item from %s: %s %s", peer[:16], reason, message[:200])

    # -- views -------------------------------------------------------------------------

    def reflection_records(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Rows for ``reflections_frame``, newest first (the store returns at most 200)."""
        return [
            {
                "id": str(stored.id),
                "category": stored.reflection.category,
                "description": stored.reflection.description,
                "outcome": stored.reflection.outcome,
                "tags": list(stored.tags),
                "source": stored.source,
                "shared_from": stored.shared_from,
                "author": stored.reflection.author,
                "timestamp": stored.reflection.timestamp,
            }
            for stored in self.store.recent(limit)
        ]

    def latest_reflections(self, n: int = 5) -> list[dict[str, Any]]:
        """The newest reflections for the dashboard."""
        return [
            {
                "category": stored.reflection.category,
                "description": stored.reflection.description,
                "outcome": stored.reflection.outcome,
                "shared_from": stored.shared_from,
                "timestamp": stored.reflection.timestamp,
            }
            for stored in self.store.recent(n)
        ]

    async def close(self) -> None:
        """Unregister the handlers and cancel peer questions still in flight."""
        self._closed = True
        for type_ in (REFLECTION_SHARE, KNOWLEDGE_REQUEST):
            self.node.endpoint.unregister_message_handler(type_)
        await self._tasks.close()


def _merge_artifacts(
    query: str, sources: list[tuple[str, list[dict[str, Any]]]], limit: int
) -> list[dict[str, Any]]:
    """Artifacts from every source, ranked by keyword match; the same path from two
    peers is two files, so only exact (peer, path) repeats are dropped."""
    terms = query_terms(query)
    seen: set[tuple[str, str]] = set()
    ranked: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for source, items in sources:
        for item in items[:MAX_ANSWER_ITEMS]:
            key = (source, str(item["path"]))
            if key in seen:
                continue
            seen.add(key)
            text = key[1].replace("/", " ").replace(".", " ")
            ranked.append((keyword_score(terms, text), {**item, "from_peer": source}))
    ranked.sort(key=lambda pair: pair[0], reverse=True)
    return [item for _, item in ranked[:limit]]
