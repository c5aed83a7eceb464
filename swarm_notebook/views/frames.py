"""pandas DataFrame views of swarm state, with explicit dtypes.

Each builder takes the plain dicts the coordinator produces and returns a frame whose
columns and dtypes do not depend on the data (an empty input gives an empty frame with
the same schema), so notebook code can filter and plot without guessing types.

Input that does not fit the documented shape raises :class:`FrameInputError` with a
short reason code instead of being dropped or silently coerced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from swarm_notebook.errors import FrameInputError, short_id
from swarm_notebook.membership.node import PeerState
from swarm_notebook.reasons import Reason
from swarm_notebook.views.status import success_rate
from swarm_notebook.workload.records import TaskState
from swarm_notebook.workload.refs import RefState

TEXT = pd.StringDtype()
UTC_TIME = pd.DatetimeTZDtype(unit="ns", tz="UTC")
DURATION = "timedelta64[ns]"

PEER_STATE = pd.CategoricalDtype([str(s) for s in PeerState])
TASK_STATE = pd.CategoricalDtype([str(s) for s in TaskState], ordered=True)
RISK = pd.CategoricalDtype(["low", "medium", "high"], ordered=True)

STAT_COUNTERS = (
    "total_tasks",
    "tasks_completed",
    "tasks_failed",
    "tasks_canceled",
    "tasks_not_sent",
    "patterns_shared",
    "consensus_requests",
    "knowledge_queries",
    "connected_peers",
    "total_peers",
)


def _require(record: Mapping[str, Any], key: str, what: str, index: int) -> Any:
    if key not in record or record[key] is None:
        raise FrameInputError(Reason.MISSING_FIELD, f"{what} #{index} has no {key!r}")
    return record[key]


def _number(value: Any, field: str, what: str, index: int) -> float:
    """Numeric field as float; None means missing (NaN), anything else non-numeric is an error."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FrameInputError(
            Reason.BAD_NUMBER, f"{what} #{index} {field}={value!r} is not a number"
        )
    return float(value)


def _whole(value: Any, field: str, what: str, index: int) -> int | None:
    number = _number(value, field, what, index)
    if math.isnan(number):
        return None
    if not number.is_integer():
        raise FrameInputError(Reason.BAD_NUMBER, f"{what} #{index} {field}={value!r} is not whole")
    return int(number)


def _text(values: Iterable[Any]) -> pd.Series:
    return pd.Series([None if v is None else str(v) for v in values], dtype=TEXT)


def _times(values: Sequence[float]) -> pd.Series:
    seconds = pd.Series(values, dtype="float64")
    return pd.to_datetime(seconds, unit="s", utc=True).astype(UTC_TIME)


def _frame(columns: dict[str, pd.Series], index: pd.Index | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({name: series.reset_index(drop=True) for name, series in columns.items()})
    if index is not None:
        frame.index = index
    return frame


def _records(records: Iterable[Mapping[str, Any]], what: str) -> list[Mapping[str, Any]]:
    rows = list(records)
    for index, record in enumerate(rows):
        if not isinstance(record, Mapping):
            raise FrameInputError(
                Reason.BAD_RECORD, f"{what} #{index} is {type(record).__name__}, expected a dict"
            )
    return rows


def _column(rows: Sequence[Mapping[str, Any]], field: str, what: str, convert: Any) -> list[Any]:
    return [convert(row.get(field), field, what, index) for index, row in enumerate(rows)]


def peers_frame(snapshot: Mapping[str, Any]) -> pd.DataFrame:
    """One row per known peer: id, name, capabilities, link state, load and round-trip time.

    ``capabilities`` is a comma-separated string, so ``frame.capabilities.str.contains``
    filters peers by what they can do; ``rtt_ms`` is NaN until a heartbeat measured it.

    >>> peers_frame({"peers": [{"id": "p1", "capabilities": ["python-execution"],
    ...     "state": "connected", "load": 0.5, "in_flight": 1, "concurrency": 2,
    ...     "rtt_ms": 0.4}]})[["peer_id", "state", "load"]]
      peer_id      state  load
    0      p1  connected   0.5
    """
    peers = _records(snapshot.get("peers") or [], "peer")
    ids = [_require(peer, "id", "peer", index) for index, peer in enumerate(peers)]
    return _frame(
        {
            "peer_id": _text(ids),
            "name": _text(peer.get("name") for peer in peers),
            "capabilities": _text(
                ", ".join(str(c) for c in peer.get("capabilities") or []) for peer in peers
            ),
            "state": pd.Series(
                _column(peers, "state", "peer", _state(PEER_STATE)), dtype=PEER_STATE
            ),
            "load": pd.Series(_column(peers, "load", "peer", _number), dtype="float64"),
            "in_flight": pd.Series(_column(peers, "in_flight", "peer", _count), dtype="int64"),
            "concurrency": pd.Series(_column(peers, "concurrency", "peer", _count), dtype="int64"),
            "rtt_ms": pd.Series(_column(peers, "rtt_ms", "peer", _number), dtype="float64"),
            "route": _text(peer.get("route") for peer in peers),
            "ice_server": _text(peer.get("ice_server") for peer in peers),
            "bytes_in": pd.Series(_column(peers, "bytes_in", "peer", _count), dtype="int64"),
            "bytes_out": pd.Series(_column(peers, "bytes_out", "peer", _count), dtype="int64"),
            # How the peer isolates other peers' code: bubblewrap, none (unsafe) or empty.
            "isolation": _text(peer.get("isolation") for peer in peers),
            # What runs it: sandbox, dask (a Dask cluster, unisolated) or empty.
            "backend": _text(peer.get("backend") for peer in peers),
            # What it runs, from its card: "python 3.11.9, numpy 2.1.3, pandas 2.2.3".
            "versions": _text(_versions(peer.get("environment")) for peer in peers),
        }
    )


def _versions(environment: Any) -> str | None:
    if not isinstance(environment, Mapping) or not environment:
        return None
    return ", ".join(f"{name} {version}" for name, version in environment.items())


def _count(value: Any, field: str, what: str, index: int) -> int:
    """Counter that the coordinator may leave out while it is zero."""
    return _whole(value, field, what, index) or 0


def _state(dtype: pd.CategoricalDtype) -> Any:
    def convert(value: Any, field: str, what: str, index: int) -> str:
        if value not in dtype.categories:
            allowed = ", ".join(dtype.categories)
            raise FrameInputError(
                Reason.UNKNOWN_CATEGORY,
                f"{what} #{index} {field}={value!r}; expected one of {allowed}",
            )
        return str(value)

    return convert


def tasks_frame(
    records: Iterable[Mapping[str, Any]], peer_names: Mapping[str, str | None] | None = None
) -> pd.DataFrame:
    """Delegated tasks indexed by task id, with UTC timestamps and a ``duration`` column.

    ``peer`` is the peer's name from ``peer_names`` (its card), or its shortened id when
    it has none; ``peer_id`` is the full id.

    ``state`` is an ordered category (submitted < working < completed < failed <
    canceled < rejected); ``duration`` is ``finished_at - started_at`` and NaT while a
    task has not finished. Byte and attempt counts are nullable (``<NA>`` when unknown).

    >>> frame = tasks_frame([{"id": "t1", "type": "python-computation", "peer": "p1",
    ...     "state": "completed", "submitted_at": 10.0, "started_at": 10.5,
    ...     "finished_at": 12.0, "bytes_in": 10, "bytes_out": 20, "attempts": 1}])
    >>> frame.loc["t1", "duration"]
    Timedelta('0 days 00:00:01.500000')
    """
    rows = _records(records, "task")
    ids = [str(_require(row, "id", "task", index)) for index, row in enumerate(rows)]
    duplicates = sorted({task_id for task_id in ids if ids.count(task_id) > 1})
    if duplicates:
        raise FrameInputError(Reason.DUPLICATE_ID, f"task ids appear more than once: {duplicates}")
    stamps = {
        field: _times(_column(rows, field, "task", _number))
        for field in ("submitted_at", "started_at", "finished_at")
    }
    columns = {
        "type": _text(_require(row, "type", "task", index) for index, row in enumerate(rows)),
        "peer": _text(_peer_label(row.get("peer"), peer_names or {}) for row in rows),
        "peer_id": _text(row.get("peer") for row in rows),
        "state": pd.Series(_column(rows, "state", "task", _state(TASK_STATE)), dtype=TASK_STATE),
        **stamps,
        **{
            field: pd.Series(_column(rows, field, "task", _whole), dtype="Int64")
            for field in ("bytes_in", "bytes_out", "attempts")
        },
        "error": _text(row.get("error") for row in rows),
        "duration": (stamps["finished_at"] - stamps["started_at"]).astype(DURATION),
    }
    return _frame(columns, pd.Index(ids, dtype=TEXT, name="id"))


def _labels(peers: Iterable[str], names: Mapping[str, str | None]) -> list[str]:
    return [names.get(peer) or short_id(peer) for peer in peers]


def _peer_label(peer: Any, names: Mapping[str, str | None]) -> str | None:
    if peer is None:
        return None
    return names.get(str(peer)) or short_id(str(peer))


def _last_activity_timestamp(snapshot: Mapping[str, Any]) -> Any:
    last = snapshot.get("last_activity")
    return last.get("timestamp") if isinstance(last, Mapping) else None


def stats_frame(snapshot: Mapping[str, Any]) -> pd.DataFrame:
    """The coordinator counters as a one-row frame, plus ``success_rate`` (percent).

    ``success_rate`` counts only tasks a peer ran or refused (see ``success_rate``) and
    is NaN while none has finished.

    >>> stats_frame({"total_tasks": 4, "tasks_completed": 3, "tasks_failed": 1}
    ...             )["success_rate"].iloc[0]
    np.float64(75.0)
    """
    columns = {
        name: pd.Series([_count(snapshot.get(name), name, "stats", 0)], dtype="int64")
        for name in STAT_COUNTERS
    }
    rate = success_rate(snapshot)
    # NaN (not 100) before any task finished: an idle swarm has no success rate yet.
    columns["success_rate"] = pd.Series(
        [math.nan if rate is None else float(rate)], dtype="float64"
    )
    columns["last_activity"] = _times(
        [_number(_last_activity_timestamp(snapshot), "last_activity", "stats", 0)]
    )
    return _frame(columns)


def consensus_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Consensus decisions: target, risk, outcome and vote counts per proposal.

    ``outcome`` is a nullable boolean so a proposal still being voted on shows ``<NA>``;
    ``votes_missing`` counts the peers that did not answer before the deadline.

    >>> consensus_frame([{"proposal_id": "c1", "target": "core/app.py", "risk": "high",
    ...     "consensus": False, "reason": "rejected", "approve_count": 1,
    ...     "reject_count": 2, "missing": ["p9"], "created_at": 1.0,
    ...     "decided_at": 2.0}])[["risk", "outcome", "votes_missing"]]
       risk  outcome  votes_missing
    0  high    False              1
    """
    rows = _records(records, "proposal")
    outcomes = []
    for index, row in enumerate(rows):
        outcome = row.get("consensus")
        if outcome is not None and not isinstance(outcome, bool):
            raise FrameInputError(
                Reason.BAD_OUTCOME, f"proposal #{index} consensus={outcome!r} is not a bool"
            )
        outcomes.append(outcome)
    return _frame(
        {
            "proposal_id": _text(
                _require(row, "proposal_id", "proposal", index) for index, row in enumerate(rows)
            ),
            "target": _text(row.get("target") for row in rows),
            "risk": pd.Series(_column(rows, "risk", "proposal", _state(RISK)), dtype=RISK),
            "outcome": pd.Series(outcomes, dtype="boolean"),
            "reason": _text(row.get("reason") for row in rows),
            "votes_for": pd.Series(
                _column(rows, "approve_count", "proposal", _count), dtype="int64"
            ),
            "votes_against": pd.Series(
                _column(rows, "reject_count", "proposal", _count), dtype="int64"
            ),
            "votes_missing": pd.Series(
                [len(row.get("missing") or []) for row in rows], dtype="int64"
            ),
            "created_at": _times(_column(rows, "created_at", "proposal", _number)),
            "decided_at": _times(_column(rows, "decided_at", "proposal", _number)),
        }
    )


def reflections_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Reflections (local and shared), with tags as lists and a UTC ``timestamp``.

    ``shared_from`` holds the peer a reflection came from, ``<NA>`` for local ones.

    >>> reflections_frame([{"id": "r1", "category": "perf", "description": "vectorise",
    ...     "outcome": "success", "tags": ["pandas"], "timestamp": 0.0}])["tags"].iloc[0]
    ['pandas']
    """
    rows = _records(records, "reflection")
    ids = [_require(row, "id", "reflection", index) for index, row in enumerate(rows)]

    def text(field: str) -> pd.Series:
        return _text(row.get(field) for row in rows)

    return _frame(
        {
            "id": _text(ids),
            "category": text("category"),
            "description": text("description"),
            "outcome": text("outcome"),
            "tags": pd.Series([list(row.get("tags") or []) for row in rows], dtype="object"),
            "source": text("source"),
            "shared_from": text("shared_from"),
            "author": text("author"),
            "timestamp": _times(_column(rows, "timestamp", "reflection", _number)),
        }
    )


SESSION_STATE = pd.CategoricalDtype(["open", "closed", "lost"])


def sessions_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Sessions this notebook opened: name, peer (name and id), state, runs, since when.

    >>> sessions_frame([{"name": "train", "peer": "P" * 52, "peer_name": "w0",
    ...     "state": "open", "runs": 3, "opened_at": 0.0, "idle_timeout_s": 1800.0}])[
    ...     ["name", "peer_name", "state"]].iloc[0].tolist()
    ['train', 'w0', 'open']
    """
    rows = _records(records, "session")
    names = [_require(row, "name", "session", index) for index, row in enumerate(rows)]
    states = _column(rows, "state", "session", _state(SESSION_STATE))
    return _frame(
        {
            "name": _text(names),
            "peer_name": _text(row.get("peer_name") for row in rows),
            "peer": _text(row.get("peer") for row in rows),
            "state": pd.Series(states, dtype=SESSION_STATE),
            "runs": pd.Series(_column(rows, "runs", "session", _count), dtype="int64"),
            "opened_at": _times(_column(rows, "opened_at", "session", _number)),
            "idle_timeout_s": pd.Series(
                _column(rows, "idle_timeout_s", "session", _number), dtype="float64"
            ),
            "lost_because": _text(row.get("lost_because") for row in rows),
        }
    )


REF_ROLE = pd.CategoricalDtype(["owned", "held"])
REF_STATE = pd.CategoricalDtype([str(s) for s in RefState])


def refs_frame(
    records: Iterable[Mapping[str, Any]], peer_names: Mapping[str, str | None] | None = None
) -> pd.DataFrame:
    """Resident data: refs this peer owns (where they are) and refs it holds for others.

    ``holders`` counts the peers keeping a copy; ``holder_names`` names them (from
    ``peer_names``, their cards, or their shortened ids), ``holder_ids`` gives their full
    ids; ``owner_name`` / ``owner`` likewise. ``state`` is held, spilled (held here on
    disk), local (only the owner's copy, no holder now) or lost.

    >>> refs_frame([{"ref_id": "ab12", "role": "owned", "owner": "P", "size": 10,
    ...     "holders": ["W"], "dtypes": {"a": "int64"}, "owner_copy": True, "lost": False,
    ...     "state": "held", "tasks": 2, "created_at": 0.0}], {"W": "w0"}
    ...     )[["holder_names", "holder_ids", "state"]].iloc[0].tolist()
    ['w0', 'W', 'held']
    """
    rows = _records(records, "ref")
    names = peer_names or {}
    ids = [_require(row, "ref_id", "ref", index) for index, row in enumerate(rows)]
    roles = _column(rows, "role", "ref", _state(REF_ROLE))
    holders = [[str(h) for h in row.get("holders") or []] for row in rows]
    return _frame(
        {
            "ref_id": _text(ids),
            "role": pd.Series(roles, dtype=REF_ROLE),
            "state": pd.Series(_column(rows, "state", "ref", _state(REF_STATE)), dtype=REF_STATE),
            "owner_name": _text(_peer_label(row.get("owner"), names) for row in rows),
            "owner": _text(row.get("owner") for row in rows),
            "size": pd.Series(_column(rows, "size", "ref", _count), dtype="int64"),
            "holders": pd.Series([len(h) for h in holders], dtype="int64"),
            "holder_names": _text(", ".join(_labels(h, names)) for h in holders),
            "holder_ids": _text(",".join(h) for h in holders),
            "dtypes": _text(
                ", ".join(f"{k}: {v}" for k, v in (row.get("dtypes") or {}).items()) for row in rows
            ),
            "owner_copy": pd.Series([bool(row.get("owner_copy")) for row in rows], dtype="bool"),
            "spilled": pd.Series([bool(row.get("spilled")) for row in rows], dtype="bool"),
            "lost": pd.Series([bool(row.get("lost")) for row in rows], dtype="bool"),
            "tasks": pd.Series(_column(rows, "tasks", "ref", _count), dtype="int64"),
            "created_at": _times(_column(rows, "created_at", "ref", _number)),
        }
    )
