"""DataFrame views: documented columns and dtypes, for data and for empty input."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from swarm_notebook.errors import FrameInputError
from swarm_notebook.views.frames import (
    consensus_frame,
    peers_frame,
    reflections_frame,
    stats_frame,
    tasks_frame,
)

UTC = "datetime64[ns, UTC]"


def dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {name: str(dtype) for name, dtype in frame.dtypes.items()}


PEER_DTYPES = {
    "peer_id": "string",
    "name": "string",
    "capabilities": "string",
    "state": "category",
    "load": "float64",
    "in_flight": "int64",
    "concurrency": "int64",
    "rtt_ms": "float64",
    "route": "string",
    "ice_server": "string",
    "bytes_in": "int64",
    "bytes_out": "int64",
    "isolation": "string",
    "backend": "string",
    "versions": "string",
}

TASK_DTYPES = {
    "type": "string",
    "peer": "string",
    "peer_id": "string",
    "state": "category",
    "submitted_at": UTC,
    "started_at": UTC,
    "finished_at": UTC,
    "bytes_in": "Int64",
    "bytes_out": "Int64",
    "attempts": "Int64",
    "error": "string",
    "duration": "timedelta64[ns]",
}

CONSENSUS_DTYPES = {
    "proposal_id": "string",
    "target": "string",
    "risk": "category",
    "outcome": "boolean",
    "reason": "string",
    "votes_for": "int64",
    "votes_against": "int64",
    "votes_missing": "int64",
    "created_at": UTC,
    "decided_at": UTC,
}

REFLECTION_DTYPES = {
    "id": "string",
    "category": "string",
    "description": "string",
    "outcome": "string",
    "tags": "object",
    "source": "string",
    "shared_from": "string",
    "author": "string",
    "timestamp": UTC,
}


def task(task_id: str, state: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": task_id,
        "type": "python-computation",
        "peer": "peer-a",
        "state": state,
        "submitted_at": 1_700_000_000.0,
        "started_at": None,
        "finished_at": None,
        "bytes_in": 100,
        "bytes_out": 0,
        "attempts": 1,
        "error": None,
    }
    record.update(fields)
    return record


def test_peers_frame_dtypes_and_values() -> None:
    snapshot = {
        "peers": [
            {
                "id": "A" * 52,
                "name": "alice-laptop",
                "capabilities": ["python-execution", "local-llm"],
                "state": "connected",
                "load": 0.5,
                "in_flight": 1,
                "concurrency": 2,
                "rtt_ms": 0.43,
                "route": "relay",
                "ice_server": "turn:203.0.113.9:3478",
                "bytes_in": 2048,
                "bytes_out": 512,
            },
            {"id": "B" * 52, "capabilities": [], "state": "connecting", "rtt_ms": None},
        ]
    }
    frame = peers_frame(snapshot)
    assert dtypes(frame) == PEER_DTYPES
    assert frame.loc[0, "route"] == "relay" and pd.isna(frame.loc[1, "route"])
    assert frame.loc[0, "bytes_in"] == 2048 and frame.loc[1, "bytes_out"] == 0
    assert frame.loc[0, "capabilities"] == "python-execution, local-llm"
    assert list(frame["state"].cat.categories) == ["connecting", "connected", "gone"]
    assert frame.loc[0, "name"] == "alice-laptop"
    assert pd.isna(frame.loc[1, "name"])
    assert frame.loc[1, "in_flight"] == 0
    assert pd.isna(frame.loc[1, "rtt_ms"])
    capable = frame[frame["capabilities"].str.contains("python-execution")]
    assert list(capable["peer_id"]) == ["A" * 52]


def test_tasks_frame_dtypes_duration_and_order() -> None:
    records = [
        task("t1", "completed", started_at=1_700_000_001.0, finished_at=1_700_000_003.5),
        task("t2", "working", started_at=1_700_000_002.0),
        task(
            "t3",
            "failed",
            started_at=1_700_000_002.0,
            finished_at=1_700_000_002.25,
            error="ZeroDivisionError: division by zero",
            attempts=3,
        ),
        task("t4", "submitted", peer=None, bytes_out=None),
    ]
    frame = tasks_frame(records)
    assert frame.index.name == "id"
    assert list(frame.index) == ["t1", "t2", "t3", "t4"]
    assert dtypes(frame) == TASK_DTYPES
    assert frame.loc["t1", "duration"] == pd.Timedelta(seconds=2.5)
    assert pd.isna(frame.loc["t2", "duration"])
    assert frame.loc["t1", "submitted_at"] == pd.Timestamp("2023-11-14 22:13:20", tz="UTC")
    assert frame.loc["t3", "error"].startswith("ZeroDivisionError")
    assert pd.isna(frame.loc["t4", "peer"])
    assert pd.isna(frame.loc["t4", "bytes_out"])
    state = frame["state"].cat
    assert state.ordered
    assert list(state.categories) == [
        "submitted",
        "working",
        "completed",
        "failed",
        "canceled",
        "rejected",
    ]
    assert list(frame.sort_values("state").index) == ["t4", "t2", "t1", "t3"]


def test_stats_frame_one_row_with_success_rate() -> None:
    snapshot = {
        "initialized": True,
        "connected_peers": 2,
        "total_peers": 3,
        "total_tasks": 8,
        "tasks_completed": 6,
        "tasks_failed": 2,
        "patterns_shared": 4,
        "consensus_requests": 1,
        "knowledge_queries": 5,
        "last_activity": {"kind": "task", "timestamp": 1_700_000_000.0},
    }
    frame = stats_frame(snapshot)
    assert len(frame) == 1
    assert frame.loc[0, "success_rate"] == 75.0
    assert frame.loc[0, "tasks_failed"] == 2
    counters = {name for name, dtype in dtypes(frame).items() if dtype == "int64"}
    assert counters == {
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
    }
    assert str(frame["success_rate"].dtype) == "float64"
    assert str(frame["last_activity"].dtype) == UTC
    empty = stats_frame({})
    assert pd.isna(empty.loc[0, "success_rate"])  # no task finished: no rate, not 100
    assert pd.isna(empty.loc[0, "last_activity"])


def test_consensus_frame() -> None:
    records: list[dict[str, Any]] = [
        {
            "proposal_id": "c1",
            "target": "core/app.py",
            "risk": "high",
            "consensus": False,
            "reason": "2 of 3 rejected",
            "approve_count": 1,
            "reject_count": 2,
            "missing": ["peer-z"],
            "created_at": 10.0,
            "decided_at": 12.0,
        },
        {
            "proposal_id": "c2",
            "target": "notes.md",
            "risk": "low",
            "consensus": None,
            "missing": [],
            "created_at": 11.0,
            "decided_at": None,
        },
    ]
    frame = consensus_frame(records)
    assert dtypes(frame) == CONSENSUS_DTYPES
    assert frame["risk"].cat.ordered
    assert list(frame["risk"].cat.categories) == ["low", "medium", "high"]
    assert frame["outcome"].tolist() == [False, pd.NA]
    assert (frame.loc[0, "votes_for"], frame.loc[0, "votes_against"]) == (1, 2)
    assert list(frame["votes_missing"]) == [1, 0]
    assert pd.isna(frame.loc[1, "decided_at"])


def test_reflections_frame_keeps_provenance() -> None:
    records: list[dict[str, Any]] = [
        {
            "id": "r1",
            "category": "performance",
            "description": "vectorise the groupby",
            "outcome": "success",
            "tags": ["pandas", "shared_from_peer-b"],
            "source": "swarm",
            "shared_from": "peer-b",
            "author": "peer-b",
            "timestamp": 1_700_000_000.0,
        },
        {
            "id": "r2",
            "category": "bug",
            "description": "local lesson",
            "tags": None,
            "timestamp": 1_700_000_100.0,
        },
    ]
    frame = reflections_frame(records)
    assert dtypes(frame) == REFLECTION_DTYPES
    assert frame.loc[0, "tags"] == ["pandas", "shared_from_peer-b"]
    assert frame.loc[1, "tags"] == []
    assert frame.loc[0, "shared_from"] == "peer-b"
    assert pd.isna(frame.loc[1, "shared_from"])


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: peers_frame({}), PEER_DTYPES),
        (lambda: tasks_frame([]), TASK_DTYPES),
        (lambda: consensus_frame([]), CONSENSUS_DTYPES),
        (lambda: reflections_frame([]), REFLECTION_DTYPES),
    ],
    ids=["peers", "tasks", "consensus", "reflections"],
)
def test_empty_input_gives_empty_frame_with_schema(build: Any, expected: dict[str, str]) -> None:
    frame = build()
    assert frame.empty
    assert dtypes(frame) == expected


def test_empty_tasks_frame_keeps_index_name() -> None:
    frame = tasks_frame([])
    assert frame.index.name == "id"
    assert str(frame.index.dtype) == "string"


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: tasks_frame([task("t1", "exploded")]), "unknown-category"),
        (lambda: tasks_frame([task("t1", "working"), task("t1", "completed")]), "duplicate-id"),
        (lambda: tasks_frame([task("t1", "working", submitted_at="yesterday")]), "bad-number"),
        (lambda: tasks_frame([task("t1", "working", attempts=1.5)]), "bad-number"),
        (lambda: tasks_frame([{"type": "x", "state": "working"}]), "missing-field"),
        (lambda: tasks_frame(["not a dict"]), "bad-record"),  # type: ignore[list-item]
        (lambda: peers_frame({"peers": [{"id": "p", "state": "asleep"}]}), "unknown-category"),
        (lambda: peers_frame({"peers": [{"state": "connected"}]}), "missing-field"),
        (lambda: consensus_frame([{"proposal_id": "c", "risk": "extreme"}]), "unknown-category"),
        (
            lambda: consensus_frame([{"proposal_id": "c", "risk": "low", "consensus": "yes"}]),
            "bad-outcome",
        ),
        (lambda: reflections_frame([{"description": "no id"}]), "missing-field"),
    ],
)
def test_bad_input_is_a_clear_error(build: Any, code: str) -> None:
    with pytest.raises(FrameInputError) as caught:
        build()
    assert caught.value.code == code
    assert str(caught.value).startswith(f"{code}: ")
