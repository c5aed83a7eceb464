"""Big task inputs scattered to a Dask cluster once, then reused by later tasks.

A ref put on a Dask-backed peer (``c.put(df, peer=dask_peer)``) reaches the executor as the
same encoded bytes for every task that uses it. Scattering those bytes again per task would
move the frame from this peer to a Dask worker each time; keyed by the bytes' digest, the
first task scatters them and later ones name the Dask future already on the cluster, so a
chain of tasks on one ref keeps its data where Dask put it. The cache is bounded in bytes
(least recently used entries go first; a dropped future lets Dask free the data).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

DEFAULT_MAX_BYTES = 2 * 2**30  # what the cluster keeps for reuse, on top of running tasks
MAX_ENTRIES = 256

_ENCODER = msgspec.msgpack.Encoder()


@dataclass
class _Entry:
    future: Any
    size: int


class ScatteredInputs:
    """Digest of an encoded input -> its scattered Dask future, bounded in bytes.

    >>> cache = ScatteredInputs(max_bytes=10)
    >>> cache.stats()["entries"]
    0
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self.scattered = 0
        self.reused = 0

    @staticmethod
    def size_of(value: Any) -> int:
        return len(_ENCODER.encode(value))

    async def place(self, client: Any, value: Any) -> Any:
        """The Dask future holding ``value``: the cached one, or a new scatter."""
        encoded = _ENCODER.encode(value)
        key = hashlib.blake2b(encoded, digest_size=20).digest()
        entry = self._entries.get(key)
        if entry is not None and entry.future.status == "finished":
            self._entries.move_to_end(key)
            self.reused += 1
            return entry.future
        if entry is not None:  # lost with a worker, or cancelled: scatter it again
            self._drop(key)
        [future] = await client.scatter([value], hash=False)
        self.scattered += 1
        self._entries[key] = _Entry(future, len(encoded))
        self._bytes += len(encoded)
        while self._entries and (
            self._bytes > self.max_bytes or len(self._entries) > self.max_entries
        ):
            oldest = next(iter(self._entries))
            if oldest == key:
                break  # a single input bigger than the budget is still used, just not kept
            self._drop(oldest)
        return future

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "scattered": self.scattered,
            "reused": self.reused,
        }
