"""The holder's side of resident data: encoded values other peers put here, within a budget.

Each entry is the msgpack bytes of a value encoded with the safe codec, keyed by
``(owner, ref_id)``: only tasks of the peer that put it may read it (``ref-forbidden``
otherwise). The memory budget is hard: a ``put`` that does not fit, after spilling the
least recently used entries to the spill folder (if one is configured and has room), is
refused with ``store-full`` and nothing is dropped to make room for it. Released refs are
evicted at once (their bytes freed, memory or disk); their ids are remembered (bounded) so
a later use says "released" rather than "unknown".
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm_notebook.errors import RefError
from swarm_notebook.reasons import Reason

DEFAULT_STORE_BYTES = 512 * 1024 * 1024
MAX_REMEMBERED_RELEASED = 4096


def content_digest(payload: bytes) -> str:
    """The content hash of a ref's encoded bytes (blake2b, 128 bits, hex)."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


@dataclass
class StoredRef:
    owner: str
    ref_id: str
    size: int
    digest: str
    token: str  # what another peer must show to copy it (the owner hands it out)
    dtypes: dict[str, str] = field(default_factory=dict)
    payload: bytes | None = None  # in memory, or None when spilled
    path: Path | None = None  # on disk when spilled
    stored_at: float = field(default_factory=time.time)
    reads: int = 0

    @property
    def spilled(self) -> bool:
        return self.payload is None


class RefStore:
    """Bytes of encoded values keyed by (owner, ref id), under a memory budget."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_STORE_BYTES,
        *,
        spill_dir: Path | None = None,
        max_spill_bytes: int = 0,
    ) -> None:
        if max_bytes < 0 or max_spill_bytes < 0:
            raise ValueError("store budgets must be >= 0")
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir
        self.max_spill_bytes = max_spill_bytes if spill_dir is not None else 0
        self._entries: OrderedDict[tuple[str, str], StoredRef] = OrderedDict()  # LRU order
        self._released: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.memory_bytes = 0
        self.spilled_bytes = 0
        self.counters = {"puts": 0, "refused_full": 0, "reads": 0, "spills": 0, "evicted": 0}

    # -- writing -----------------------------------------------------------------------

    def put(
        self,
        owner: str,
        ref_id: str,
        payload: bytes,
        *,
        digest: str,
        token: str,
        dtypes: dict[str, str] | None = None,
    ) -> StoredRef:
        """Keep ``payload`` for ``owner``; ``RefError`` ``store-full`` if it cannot fit.

        ``malformed`` if ``digest`` is not the payload's content hash (a corrupt copy).
        Putting the same ref again with the same content is a no-op.
        """
        size = len(payload)
        key = (owner, ref_id)
        existing = self._entries.get(key)
        if existing is not None:
            if existing.digest != digest:
                raise RefError(
                    Reason.MALFORMED, f"ref {ref_id} is already here with other content", ref_id
                )
            return existing
        if content_digest(payload) != digest:
            raise RefError(Reason.MALFORMED, f"ref {ref_id}: bytes do not match its hash", ref_id)
        if not self._make_room(size):
            self.counters["refused_full"] += 1
            raise RefError(
                Reason.STORE_FULL,
                f"ref {ref_id} ({size} bytes) does not fit: {self.memory_bytes} of "
                f"{self.max_bytes} bytes in memory, {self.spilled_bytes} of "
                f"{self.max_spill_bytes} spilled",
                ref_id,
            )
        entry = StoredRef(owner, ref_id, size, digest, token, dict(dtypes or {}), payload)
        self._entries[key] = entry
        self._released.pop(key, None)
        self.memory_bytes += size
        self.counters["puts"] += 1
        return entry

    def _make_room(self, size: int) -> bool:
        """Spill least recently used entries until ``size`` more bytes fit in memory."""
        if self.memory_bytes + size <= self.max_bytes:
            return True
        if size > self.max_bytes:
            return False
        need = self.memory_bytes + size - self.max_bytes
        victims: list[StoredRef] = []
        freed = 0
        for entry in self._entries.values():
            if freed >= need:
                break
            if not entry.spilled:
                victims.append(entry)
                freed += entry.size
        if freed < need or self.spilled_bytes + freed > self.max_spill_bytes:
            return False
        for entry in victims:
            self._spill(entry)
        return True

    def _spill(self, entry: StoredRef) -> None:
        assert self.spill_dir is not None and entry.payload is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{content_digest((entry.owner + entry.ref_id).encode())}.ref"
        path.write_bytes(entry.payload)
        entry.path = path
        entry.payload = None
        self.memory_bytes -= entry.size
        self.spilled_bytes += entry.size
        self.counters["spills"] += 1

    # -- reading -----------------------------------------------------------------------

    def lookup(self, requester: str, ref_id: str, *, owner: str | None = None) -> StoredRef:
        """The entry ``requester`` may read: its own ref, or (with ``owner``) a copy it
        was granted; ``RefError`` naming the ref otherwise."""
        key = (owner or requester, ref_id)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        if key in self._released:
            raise RefError(Reason.REF_NOT_FOUND, f"ref {ref_id} was released", ref_id)
        if any(e.ref_id == ref_id for e in self._entries.values()):
            raise RefError(Reason.REF_FORBIDDEN, f"ref {ref_id} belongs to another peer", ref_id)
        raise RefError(Reason.REF_NOT_FOUND, f"ref {ref_id} is not held here", ref_id)

    def payload(self, entry: StoredRef) -> bytes:
        """The entry's bytes, from memory or its spill file."""
        entry.reads += 1
        self.counters["reads"] += 1
        if entry.payload is not None:
            return entry.payload
        assert entry.path is not None
        return entry.path.read_bytes()

    # -- releasing ---------------------------------------------------------------------

    def release(self, owner: str, ref_id: str) -> bool:
        """Evict ``owner``'s ref; False if it was not here."""
        key = (owner, ref_id)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        if entry.spilled:
            self.spilled_bytes -= entry.size
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
        else:
            self.memory_bytes -= entry.size
        self._released[key] = None
        while len(self._released) > MAX_REMEMBERED_RELEASED:
            self._released.popitem(last=False)
        self.counters["evicted"] += 1
        return True

    def release_owner(self, owner: str) -> int:
        """Evict every ref ``owner`` put here (it left the swarm); returns how many."""
        return sum(self.release(o, r) for o, r in list(self._entries) if o == owner)

    def close(self) -> None:
        """Drop everything, spill files included."""
        for owner, ref_id in list(self._entries):
            self.release(owner, ref_id)

    # -- views -------------------------------------------------------------------------

    def entries(self, limit: int | None = None) -> list[StoredRef]:
        """What is held here, oldest stored first; with ``limit``, only the newest ones."""
        entries = sorted(self._entries.values(), key=lambda e: e.stored_at)
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return entries

    def stats(self) -> dict[str, Any]:
        return {
            "refs": len(self._entries),
            "memory_bytes": self.memory_bytes,
            "max_bytes": self.max_bytes,
            "spilled_bytes": self.spilled_bytes,
            "max_spill_bytes": self.max_spill_bytes,
            **self.counters,
        }
