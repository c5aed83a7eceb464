"""The dashboard's task views as plain data: the task stream, recent tasks, success rate.

Pure functions of task records (``TaskRecord.as_dict()`` rows), bounded so the panel
receives a few hundred bars at most whatever the log holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from swarm_notebook.workload.records import TaskState

STREAM_WINDOW_S = 300.0
STREAM_MAX_BARS = 500
RECENT_TASKS = 20

_FINISHED = {
    str(s) for s in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED)
}


class StreamLane(TypedDict):
    peer: str
    name: str | None


class StreamBar(TypedDict):
    id: str
    type: str
    lane: int
    state: str
    start: float
    end: float | None  # None: still running


class TaskStream(TypedDict):
    window_s: float
    lanes: list[StreamLane]
    bars: list[StreamBar]
    omitted: int


class TaskSummary(TypedDict):
    finished: int
    counted: int
    completed: int
    failed: int
    canceled: int
    not_sent: int
    success_rate: int | None


def _delegated(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("role", "delegated") == "delegated"]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _start(record: Mapping[str, Any]) -> float | None:
    started = _number(record.get("started_at"))
    return started if started is not None else _number(record.get("submitted_at"))


def left_this_peer(record: Mapping[str, Any]) -> bool:
    """Whether a finished task reached a peer, so its outcome says something about the swarm.

    Refusals made here (bad input, no capable peer) never left the notebook:

    >>> left_this_peer({"state": "rejected", "tried_peers": []})
    False
    >>> left_this_peer({"state": "rejected", "tried_peers": ["PEER"]})
    True
    """
    if str(record.get("state")) == TaskState.REJECTED:
        return bool(record.get("tried_peers"))
    return True


def task_summary(records: Iterable[Mapping[str, Any]]) -> TaskSummary:
    """Outcomes of delegated tasks; the success rate is None until one was counted.

    User cancels and refusals made before anything was sent are not counted:

    >>> task_summary([{"state": "completed"}, {"state": "failed"}, {"state": "canceled"},
    ...               {"state": "rejected", "tried_peers": []}])["success_rate"]
    50
    >>> task_summary([])["success_rate"] is None
    True
    """
    completed = failed = canceled = not_sent = finished = 0
    for record in _delegated(records):
        state = str(record.get("state"))
        if state not in _FINISHED:
            continue
        finished += 1
        if state == TaskState.CANCELED:
            canceled += 1
        elif not left_this_peer(record):
            not_sent += 1
        elif state == TaskState.COMPLETED:
            completed += 1
        else:
            failed += 1
    counted = completed + failed
    return TaskSummary(
        finished=finished,
        counted=counted,
        completed=completed,
        failed=failed,
        canceled=canceled,
        not_sent=not_sent,
        success_rate=round(completed / counted * 100) if counted else None,
    )


def task_stream(
    records: Iterable[Mapping[str, Any]],
    *,
    now: float,
    names: Mapping[str, str | None] | None = None,
    window_s: float = STREAM_WINDOW_S,
    limit: int = STREAM_MAX_BARS,
) -> TaskStream:
    """Delegated tasks of the last ``window_s`` seconds as bars, one lane per peer.

    Keeps the ``limit`` most recent bars (``omitted`` counts the rest); a running task's
    bar has ``end`` None. Tasks that never reached a peer have no lane.

    >>> stream = task_stream([{"id": "t1", "type": "python-computation", "peer": "P",
    ...     "state": "completed", "submitted_at": 95.0, "started_at": 96.0,
    ...     "finished_at": 98.0}], now=100.0, names={"P": "alice"})
    >>> stream["lanes"], stream["bars"][0]["start"], stream["bars"][0]["end"]
    ([{'peer': 'P', 'name': 'alice'}], 96.0, 98.0)
    """
    names = names or {}
    since = now - window_s
    shown: list[tuple[float, Mapping[str, Any]]] = []
    for record in _delegated(records):
        peer, start = record.get("peer"), _start(record)
        if not peer or start is None:
            continue
        end = _number(record.get("finished_at"))
        if end is not None and end < since:
            continue
        shown.append((start, record))
    shown.sort(key=lambda item: item[0])
    omitted = max(0, len(shown) - limit)
    shown = shown[omitted:]
    peers = sorted({str(r["peer"]) for _, r in shown}, key=lambda p: (names.get(p) or "~", p))
    lane_of = {peer: index for index, peer in enumerate(peers)}
    return TaskStream(
        window_s=window_s,
        lanes=[StreamLane(peer=p, name=names.get(p)) for p in peers],
        bars=[
            StreamBar(
                id=str(r.get("id")),
                type=str(r.get("type")),
                lane=lane_of[str(r["peer"])],
                state=str(r.get("state")),
                start=round(start, 3),
                end=_rounded(_number(r.get("finished_at"))),
            )
            for start, r in shown
        ],
        omitted=omitted,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def recent_tasks(
    records: Iterable[Mapping[str, Any]],
    *,
    names: Mapping[str, str | None] | None = None,
    limit: int = RECENT_TASKS,
) -> list[dict[str, Any]]:
    """The ``limit`` most recently finished delegated tasks, newest first.

    >>> recent_tasks([{"id": "t1", "type": "x", "peer": "P", "state": "failed",
    ...     "submitted_at": 1.0, "started_at": 2.0, "finished_at": 5.0,
    ...     "error": "ZeroDivisionError", "tried_peers": ["P"]}])[0]["duration_s"]
    3.0
    """
    names = names or {}
    finished = [
        r
        for r in _delegated(records)
        if str(r.get("state")) in _FINISHED and _number(r.get("finished_at")) is not None
    ]
    finished.sort(key=lambda r: _number(r.get("finished_at")) or 0.0, reverse=True)
    rows = []
    for r in finished[:limit]:
        end = _number(r.get("finished_at")) or 0.0
        start = _start(r)
        peer = r.get("peer")
        rows.append(
            {
                "id": str(r.get("id")),
                "type": str(r.get("type")),
                "peer": peer,
                "name": names.get(str(peer)) if peer else None,
                "state": str(r.get("state")),
                "finished_at": end,
                "duration_s": round(end - start, 3) if start is not None else None,
                "sent": left_this_peer(r),
                "error": r.get("error"),
            }
        )
    return rows
