"""The dashboard's "Resident data" section: refs this peer owns or holds, and its store.

A pure function of ref records (``SwarmCoordinator.ref_records``) and the ``refs`` part of
``get_stats()``: bounded plain data the front end only has to lay out. Holders and owners
travel as ``{"peer": id, "name": card name or None}`` so the panel shows names, with the
id a hover away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from swarm_notebook.workload.messages import PYTHON_EXECUTION

RESIDENT_MAX_ROWS = 20
MAX_COLUMNS_SHOWN = 3


def value_summary(dtypes: Mapping[str, Any] | None, shape: Any = None) -> str:
    """What a ref holds, in a few words: its shape and its first columns' dtypes.

    >>> value_summary({"a": "float64", "b": "int64"}, (200000, 2))
    '200000 × 2 · a: float64, b: int64'
    >>> value_summary({f"c{i}": "int8" for i in range(5)})
    'c0: int8, c1: int8, c2: int8, +2 more'
    >>> value_summary({}, None)
    ''
    """
    parts = []
    if isinstance(shape, list | tuple) and shape:
        parts.append(" × ".join(str(n) for n in shape))
    columns = list((dtypes or {}).items())
    if columns:
        shown = ", ".join(f"{name}: {dtype}" for name, dtype in columns[:MAX_COLUMNS_SHOWN])
        extra = len(columns) - MAX_COLUMNS_SHOWN
        parts.append(shown + (f", +{extra} more" if extra > 0 else ""))
    return " · ".join(parts)


def _peer(peer_id: Any, names: Mapping[str, str | None]) -> dict[str, Any]:
    return {"peer": str(peer_id), "name": names.get(str(peer_id))}


def _row(record: Mapping[str, Any], names: Mapping[str, str | None]) -> dict[str, Any]:
    return {
        "ref_id": str(record["ref_id"]),
        "role": record.get("role"),
        "state": record.get("state"),
        "size": int(record.get("size") or 0),
        "summary": value_summary(record.get("dtypes"), record.get("shape")),
        "holders": [_peer(h, names) for h in record.get("holders") or []],
        "owner": _peer(record.get("owner"), names),
        "tasks": int(record.get("tasks") or 0),
        "created_at": record.get("created_at"),
    }


def store_usage(
    store: Mapping[str, Any] | None, capabilities: Iterable[str]
) -> dict[str, Any] | None:
    """This peer's store, when it can hold other peers' data (it runs their Python) or
    does; None otherwise (a notebook that only puts has nothing to show here).

    >>> store_usage({"refs": 0, "puts": 0}, []) is None
    True
    >>> store_usage({"refs": 1, "memory_bytes": 10, "max_bytes": 100,
    ...     "refusals": {"store-full": 2}}, [])["refusals"]
    2
    """
    if not isinstance(store, Mapping):
        return None
    held = int(store.get("refs") or 0)
    if PYTHON_EXECUTION not in set(capabilities) and not held and not store.get("puts"):
        return None
    raw = store.get("refusals")
    refusals: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    # The holder refuses a value bigger than its whole store before the store sees it, so
    # the store's own refused_full misses those: the holder's count by reason has both.
    full = max(int(store.get("refused_full") or 0), int(refusals.get("store-full") or 0))
    return {
        "refs": held,
        "memory_bytes": int(store.get("memory_bytes") or 0),
        "max_bytes": int(store.get("max_bytes") or 0),
        "spilled_bytes": int(store.get("spilled_bytes") or 0),
        "max_spill_bytes": int(store.get("max_spill_bytes") or 0),
        "spills": int(store.get("spills") or 0),
        "evicted": int(store.get("evicted") or 0),
        "refused_full": full,
        # Every refusal (full, forbidden, malformed, ...), of which refused_full is one kind.
        "refusals": max(full, sum(int(n) for n in refusals.values())),
    }


def resident_data(
    records: Iterable[Mapping[str, Any]],
    refs_stats: Mapping[str, Any] | None,
    names: Mapping[str, str | None],
    *,
    capabilities: Iterable[str] = (),
    limit: int = RESIDENT_MAX_ROWS,
) -> dict[str, Any]:
    """The newest ``limit`` refs (owned and held here), how many more there are, and the
    store's use.

    ``records`` may already be cut (the coordinator's bounded read): the totals come from
    ``refs_stats`` (``owned`` and ``store.refs``), so "and N more" counts every ref.

    >>> data = resident_data([{"ref_id": "r1", "role": "owned", "state": "held",
    ...     "size": 8, "holders": ["W"], "owner": "ME", "created_at": 1.0}],
    ...     {"owned": 3, "store": {"refs": 0}}, {"W": "w0"})
    >>> data["refs"][0]["holders"], data["omitted"], data["store"]
    ([{'peer': 'W', 'name': 'w0'}], 2, None)
    """
    # Records come oldest first: reversed, a stable sort keeps the later of two refs put
    # in the same clock tick first.
    rows = [_row(r, names) for r in reversed(list(records))]
    rows.sort(key=lambda r: float(r["created_at"] or 0.0), reverse=True)
    stats = refs_stats or {}
    raw_store = stats.get("store")
    store: Mapping[str, Any] = raw_store if isinstance(raw_store, Mapping) else {}
    total = max(len(rows), int(stats.get("owned") or 0) + int(store.get("refs") or 0))
    shown = rows[: max(0, limit)]
    return {
        "refs": shown,
        "total": total,
        "omitted": total - len(shown),
        "owned": int(stats.get("owned") or 0),
        "owned_bytes": int(stats.get("owned_bytes") or 0),
        "owned_lost": int(stats.get("owned_lost") or 0),
        "store": store_usage(store, capabilities),
    }
