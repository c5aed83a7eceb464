"""Ref inputs kept decoded in a bubblewrap child between one owner's tasks (resident.py).

Real sandbox children; the ``ResidentInput`` readers count their reads, so "not sent
again" is observed at the source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from swarm_notebook.errors import RefError
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import ResidentInput, TaskContext
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from swarm_notebook.workload.sandbox.resident import ResidentValues, fresh_view

OWNER = TaskContext(task_id="t-1", delegator="peer-a")


class CountingRef:
    """A stored value's reader, as the ref service hands one to the pool."""

    def __init__(self, value: Any, digest: str) -> None:
        self.encoded = encode_value(value)
        self.digest = digest
        self.reads = 0

    def load(self) -> Any:
        self.reads += 1
        return self.encoded

    def resident(self, size: int = 1000) -> ResidentInput:
        return ResidentInput(self.digest, size, self.load)


def with_refs(ctx: TaskContext, **refs: ResidentInput) -> TaskContext:
    return dataclasses.replace(ctx, resident_inputs=refs)


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512, max_resident_bytes=2500)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


def frame() -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(1000, dtype="float64"), "b": np.ones(1000)})


async def test_a_ref_is_sent_to_the_child_once_and_each_task_gets_its_own_view(
    pool: PythonSandboxPool,
) -> None:
    df = frame()
    ref = CountingRef(df, "d" * 32)
    ctx = with_refs(OWNER, df=ref.resident())
    # The first task changes its input in place; the next ones must not see it.
    first = await pool.run(
        {"code": "df['a'] = 0.0\ndf.iloc[0, 1] = 99.0\ndf['c'] = 1\nfloat(df['a'].sum())"}, ctx
    )
    assert first["success"], first
    assert decode_value(first["value"]) == 0.0
    for _ in range(3):
        again = await pool.run({"code": "(float(df['a'].sum()), float(df['b'].sum()), "
                                "list(df.columns))"}, ctx)  # fmt: skip
        assert again["success"], again
        assert decode_value(again["value"]) == (float(df["a"].sum()), 1000.0, ["a", "b"])
    assert ref.reads == 1  # read from the store once; the child kept it
    stats = pool.stats()
    assert stats["resident_sent"] == 1 and stats["resident_hits"] == 3
    assert "resident_kept" not in again  # internal: never travels back


async def test_the_oldest_kept_ref_is_dropped_past_the_budget_and_sent_again(
    pool: PythonSandboxPool,
) -> None:
    one, two, three = (CountingRef(np.full(10, i), str(i) * 32) for i in (1, 2, 3))
    for ref, value in ((one, 1), (two, 2), (three, 3), (one, 1)):
        # 1000 + 1000 + 1000 > 2500: keeping "three" drops "one", so "one" is sent again.
        result = await pool.run({"code": "int(x[0])"}, with_refs(OWNER, x=ref.resident()))
        assert result["success"], result
        assert decode_value(result["value"]) == value
    assert (one.reads, two.reads, three.reads) == (2, 1, 1)


async def test_a_ref_larger_than_the_budget_is_sent_every_time_and_not_kept(
    pool: PythonSandboxPool,
) -> None:
    big = CountingRef(np.arange(5), "b" * 32)
    for _ in range(2):
        result = await pool.run(
            {"code": "int(x.sum())"}, with_refs(OWNER, x=big.resident(size=10_000))
        )
        assert decode_value(result["value"]) == 10
    assert big.reads == 2


async def test_another_peer_never_gets_a_child_that_keeps_someone_elses_ref(
    pool: PythonSandboxPool,
) -> None:
    ref = CountingRef(frame(), "e" * 32)
    assert (await pool.run({"code": "len(df)"}, with_refs(OWNER, df=ref.resident())))["success"]
    other = dataclasses.replace(OWNER, delegator="peer-b")
    # Peer b names the same digest without owning a kept copy: its child has none and is
    # sent the value by its own reader (which the ref service gives only to its owner).
    mine = CountingRef(frame(), "e" * 32)
    result = await pool.run({"code": "len(df)"}, with_refs(other, df=mine.resident()))
    assert decode_value(result["value"]) == 1000
    assert mine.reads == 1
    assert pool.stats()["recycled_for_isolation"] >= 1


async def test_a_ref_gone_before_the_task_ran_is_a_clear_failure(
    pool: PythonSandboxPool,
) -> None:
    def gone() -> Any:
        raise RefError(Reason.REF_NOT_FOUND, "ref abc was released", "abc")

    result = await pool.run(
        {"code": "len(df)"}, with_refs(OWNER, df=ResidentInput("f" * 32, 10, gone))
    )
    assert not result["success"]
    assert result["error_type"] == Reason.REF_NOT_FOUND and "abc" in result["error"]
    assert (await pool.run({"code": "6 * 7"}, OWNER))["success"]  # the child is free again


def test_fresh_view_isolates_every_kind_of_value() -> None:
    kept = ResidentValues()
    arr, mapping = np.zeros(3), {"k": [1, 2]}
    kept.keep("a", arr)
    kept.keep("m", mapping)
    view = kept.lend("a")
    view[0] = 5
    assert arr[0] == 0
    lent = kept.lend("m")
    lent["k"].append(3)
    assert mapping == {"k": [1, 2]}
    assert fresh_view("text") == "text"
    kept.drop(["a"])
    assert "a" not in kept and kept.digests() == ["m"]
    with pytest.raises(KeyError):
        kept.lend("a")
