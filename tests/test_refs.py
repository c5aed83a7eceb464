"""Resident data against real workers: put once, run where the data is, keep results remote.

Peers are ``swarm-notebook worker`` processes behind a real signaling server; the notebook
side is a ``Coordinator`` in this process. Byte counts come from the links' own counters,
so "the data did not travel again" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import swarm_notebook
from swarm_notebook.client import Coordinator, join
from swarm_notebook.errors import RefError, TaskRefused
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingServer
from swarm_notebook.workload.messages import REF_PUT
from tests.support.procs import WorkerProcess, start_workers

pytestmark = pytest.mark.timeout(240)

ROWS = 200_000  # ~3.2 MB encoded: large next to a task message, small for the test


def column_total(df: pd.DataFrame, column: str) -> float:
    return float(df[column].sum())


def doubled(df: pd.DataFrame) -> pd.DataFrame:
    return df * 2


def frame(seed: int = 0, rows: int = ROWS) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.random(rows), "b": np.arange(rows, dtype="int64")})


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Re-check a condition every 20 ms until it holds (the condition is the sync point)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def capable(c: Coordinator) -> int:
    return sum(1 for p in c.get_stats()["peers"] if "python-execution" in p["capabilities"])


def link(c: Coordinator, peer_id: str) -> dict[str, Any]:
    return next(p for p in c.get_stats()["peers"] if p["id"] == peer_id)


@pytest.fixture
async def swarm(server: SignalingServer, tmp_path: Path) -> Any:
    workers = await start_workers(server.url, "refs", tmp_path, 2, "--caps", "python-execution")
    c = await join("refs", signaling=server.url, profile=tmp_path / "me")
    try:
        await until(lambda: capable(c) == 2, "two workers")
        yield c, workers
    finally:
        await c.leave()
        await asyncio.gather(*(w.stop() for w in workers))
        for w in workers:
            assert w.problems() == [], w.problems()


async def test_tasks_on_a_ref_run_on_its_holder_and_the_data_crosses_once(swarm: Any) -> None:
    c, workers = swarm
    df = frame()
    ref = await c.put(df)
    assert isinstance(ref, swarm_notebook.RemoteRef)
    assert ref.owner == c.peer_id and len(ref.holders) == 1
    assert ref.dtypes == {"a": "float64", "b": "int64"} and ref.shape == df.shape
    assert len(ref.digest) == 32 and ref.size > df.memory_usage().sum() * 0.9
    holder = ref.holders[0]
    assert holder in {w.peer_id for w in workers}
    sent_after_put = link(c, holder)["bytes_out"]
    assert sent_after_put >= ref.size  # the one upload

    futures = [c.submit(column_total, ref, "a") for _ in range(5)]
    totals = [await f for f in futures]
    assert totals == [pytest.approx(float(df["a"].sum()))] * 5
    assert {f.peer for f in futures} == {holder}  # locality: every task ran on the holder
    # No re-upload: five tasks together sent far less than the frame once.
    assert link(c, holder)["bytes_out"] - sent_after_put < ref.size / 10
    refs = c.get_stats()["refs"]
    assert refs["pushes"] == 1 and refs["bytes_pushed"] == ref.size

    # keyword arguments take refs as well
    assert await c.submit(column_total, df=ref, column="b") == float(df["b"].sum())
    frame_rows = c.refs_frame()
    assert frame_rows.loc[0, "ref_id"] == ref.ref_id and frame_rows.loc[0, "holders"] == 1
    assert frame_rows.loc[0, "tasks"] >= 6

    # fetch brings back an equal frame
    pd.testing.assert_frame_equal(await ref.fetch(), df)


async def test_a_chain_of_kept_outputs_never_brings_the_data_home(swarm: Any) -> None:
    c, _ = swarm
    df = frame(1)
    ref = await c.put(df)
    holder = ref.holders[0]
    received_before = link(c, holder)["bytes_in"]
    twice = await c.submit(doubled, ref, keep=True)
    assert isinstance(twice, swarm_notebook.RemoteRef)
    assert twice.holders == (holder,) and twice.owner == c.peer_id
    four = await c.submit(doubled, twice, keep=True)
    total = await c.submit(column_total, four, "a")
    assert total == pytest.approx(float(df["a"].sum()) * 4)
    # Two frames were made over there; what came home is a few small replies.
    assert link(c, holder)["bytes_in"] - received_before < ref.size / 10
    # delegate_task takes refs as inputs and keep= outputs as well
    r = await c.delegate_task(
        "python-computation",
        {"code": "big = df + 1\nlen(big)", "inputs": {"df": four}, "outputs": ["big"],
         "keep": ["big"]},
    )
    assert r["success"] and r["value"] == ROWS
    assert isinstance(r["outputs"]["big"], swarm_notebook.RemoteRef)
    pd.testing.assert_frame_equal(await r["outputs"]["big"].fetch(), df * 4 + 1)
    pd.testing.assert_frame_equal(await c.fetch(twice), df * 2)  # from the holder


async def test_a_task_on_another_peer_moves_the_data_peer_to_peer(swarm: Any) -> None:
    c, workers = swarm
    df = frame(2)
    ref = await c.put(df)
    holder = ref.holders[0]
    other = next(w.peer_id for w in workers if w.peer_id != holder)
    sent = link(c, other)["bytes_out"]
    assert await c.submit(column_total, ref, "a", peer=other) == pytest.approx(df["a"].sum())
    assert set(ref.holders) == {holder, other}
    stats = c.get_stats()["refs"]
    assert stats["peer_copies"] == 1 and stats["pushes"] == 1  # the owner uploaded once
    assert link(c, other)["bytes_out"] - sent < ref.size / 10


async def test_bad_refs_are_clear_errors_naming_them(
    swarm: Any, server: SignalingServer, tmp_path: Path
) -> None:
    c, workers = swarm
    ref = await c.put(frame(3, rows=1000))
    other = await join("refs", signaling=server.url, profile=tmp_path / "other")
    try:
        await until(lambda: capable(other) == 2, "the workers, seen by the other notebook")
        with pytest.raises(TaskRefused) as refused:
            await other.submit(column_total, ref, "a")
        assert refused.value.reason == Reason.REF_FORBIDDEN
        assert ref.ref_id in refused.value.message
    finally:
        await other.leave()

    await ref.release()
    assert ref.holders == ()
    with pytest.raises(RefError, match=f"{ref.ref_id} was released") as gone:
        await c.submit(column_total, ref, "a")
    assert gone.value.reason == Reason.REF_NOT_FOUND and gone.value.ref_id == ref.ref_id
    with pytest.raises(RefError, match="was released"):
        await ref.release()
    with pytest.raises(RefError, match="no-such-ref") as unknown:
        await c.fetch("no-such-ref")
    assert unknown.value.reason == Reason.REF_NOT_FOUND

    # A payload whose bytes do not match its hash is refused by the holder as malformed.
    holder = workers[0].peer_id
    with pytest.raises(swarm_notebook.RemoteError) as bad:
        await c._runner.call(
            c._core.node.endpoint.request(
                holder, REF_PUT,
                {"ref_id": "forged", "digest": "0" * 32, "token": "t", "payload": b"\x90"},
            )
        )
    assert bad.value.reason == Reason.MALFORMED
    assert c.get_stats()["rejections"].get("malformed", 0) == 0  # refused there, not here


async def test_a_full_holder_refuses_the_put_and_release_frees_its_bytes(
    server: SignalingServer, tmp_path: Path
) -> None:
    worker = await WorkerProcess.start(
        server.url, "full", str(tmp_path / "w"), "--caps", "python-execution",
        "--store-mb", "5", name="small",
    )  # fmt: skip
    c = await join("full", signaling=server.url, profile=tmp_path / "me")
    try:
        await until(lambda: capable(c) == 1, "the worker")
        first_df, second_df = frame(4), frame(5)
        first = await c.put(first_df)
        with pytest.raises(RefError) as full:
            await c.put(second_df)
        assert full.value.reason == Reason.STORE_FULL
        assert "stays here" in full.value.message
        # The owner keeps its data: the first ref still works, the refused value is intact.
        assert await c.submit(column_total, first, "a") == pytest.approx(first_df["a"].sum())
        pd.testing.assert_frame_equal(second_df, frame(5))
        # Releasing frees the holder's bytes: the same put now fits.
        await first.release()
        second = await c.put(second_df)
        assert await c.submit(column_total, second, "b") == float(second_df["b"].sum())
    finally:
        await c.leave()
        await worker.stop()


async def test_a_killed_holder_costs_no_data(swarm: Any) -> None:
    c, workers = swarm
    df = frame(6)
    ref = await c.put(df)
    dead = next(w for w in workers if w.peer_id == ref.holders[0])
    survivor = next(w for w in workers if w is not dead)
    dead.kill()  # SIGKILL: no goodbye, the link just stops
    await until(lambda: ref.holders == (survivor.peer_id,), "the owner's re-push", timeout=60)
    assert c.get_stats()["refs"]["repushes"] == 1
    fut = c.submit(column_total, ref, "a")
    assert await fut == pytest.approx(df["a"].sum())
    assert fut.peer == survivor.peer_id
    await dead.stop()


async def test_a_kept_output_with_two_replicas_survives_its_maker(
    swarm: Any, server: SignalingServer, tmp_path: Path
) -> None:
    c, workers = swarm
    df = frame(7)
    ref = await c.put(df)
    twice = await c.submit(doubled, ref, keep=True, keep_replicas=2)
    maker = next(w for w in workers if w.peer_id == ref.holders[0])  # ran where ref is
    survivor = next(w for w in workers if w is not maker)
    # The future resolved after the copy: both workers hold it, copied peer to peer.
    assert set(twice.holders) == {maker.peer_id, survivor.peer_id}
    stats = c.get_stats()["refs"]
    assert stats["replications"] == 1 and stats["under_replicated"] == 0
    assert link(c, survivor.peer_id)["bytes_out"] < twice.size / 10  # not through us

    # The copy is the owner's: another notebook's task there is refused.
    other = await join("refs", signaling=server.url, profile=tmp_path / "other")
    try:
        await until(lambda: capable(other) == 2, "the workers, seen by the other notebook")
        with pytest.raises(TaskRefused) as refused:
            await other.submit(column_total, twice, "a", peer=survivor.peer_id)
        assert refused.value.reason == Reason.REF_FORBIDDEN
    finally:
        await other.leave()

    maker.kill()
    await until(lambda: twice.holders == (survivor.peer_id,), "the maker's death", timeout=60)
    fut = c.submit(column_total, twice, "a")
    assert await fut == pytest.approx(float(df["a"].sum()) * 2)
    assert fut.peer == survivor.peer_id
    await until(lambda: ref.holders == (survivor.peer_id,), "the put ref re-pushed", timeout=60)
    assert c.get_stats()["refs"]["under_replicated"] == 1  # the kept one: no third peer yet

    third = await WorkerProcess.start(
        server.url, "refs", str(tmp_path / "w2"), "--caps", "python-execution", name="w2"
    )
    try:
        await until(
            lambda: set(twice.holders) == {survivor.peer_id, third.peer_id},
            "the replica count restored on the new worker",
            timeout=60,
        )
        stats = c.get_stats()["refs"]
        assert stats["replications"] == 2 and stats["lost"] == 0
        assert stats["under_replicated"] == 0
        total = await c.submit(column_total, twice, "b", peer=third.peer_id)
        assert total == float(df["b"].sum()) * 2
        assert third.problems() == []
    finally:
        await third.stop()
        await maker.stop()


async def test_a_kept_output_dies_with_its_only_holder_and_names_its_task(swarm: Any) -> None:
    c, workers = swarm
    ref = await c.put(frame(8, rows=1000))
    with pytest.raises(swarm_notebook.UsageError, match="keep_replicas needs keep"):
        c.submit(doubled, ref, keep_replicas=2)
    with pytest.raises(swarm_notebook.TaskInputError, match="keep_replicas must be"):
        await c.delegate_task(
            "python-computation", {"code": "1", "keep": ["x"], "keep_replicas": 0}
        )
    made = c.submit(doubled, ref, keep=True)
    twice = await made
    maker = next(w for w in workers if w.peer_id == twice.holders[0])
    maker.kill()
    # Used at once, before or after the owner notices: an error, never a hang.
    with pytest.raises(RefError) as lost:
        await asyncio.wait_for(c.submit(column_total, twice, "a"), 60)
    assert lost.value.reason == Reason.REF_LOST and lost.value.ref_id == twice.ref_id
    for part in (twice.ref_id, made.task_id, "doubled", maker.name):
        assert part in lost.value.message, (part, lost.value.message)

    await until(lambda: c.get_stats()["refs"]["lost"] == 1, "the ref marked lost", timeout=60)
    with pytest.raises(RefError, match="re-run it") as again:
        await c.submit(column_total, twice, "a")
    assert again.value.reason == Reason.REF_LOST
    assert f"{maker.name} ({maker.peer_id[:16]})" in again.value.message
    assert made.task_id in again.value.message
    assert c.refs_frame().set_index("ref_id").loc[twice.ref_id, "lost"]
    # The task that made it was never run again.
    assert [r["id"] for r in c.task_records()].count(made.task_id) == 1
    assert c.task_record(made.task_id)["state"] == "completed"
    await twice.release()  # a lost ref can still be forgotten
    await maker.stop()


async def test_a_holder_spills_to_disk_within_its_budgets(
    server: SignalingServer, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    small, roomy = await asyncio.gather(
        WorkerProcess.start(
            server.url, "spill", str(tmp_path / "small"), "--caps", "python-execution",
            "--store-mb", "5", "--spill-dir", str(spill), "--spill-mb", "4", name="small",
        ),
        WorkerProcess.start(
            server.url, "spill", str(tmp_path / "roomy"), "--caps", "python-execution",
            name="roomy",
        ),
    )  # fmt: skip
    c = await join("spill", signaling=server.url, profile=tmp_path / "me")
    try:
        await until(lambda: capable(c) == 2, "the workers")
        first_df, second_df, third_df = frame(10), frame(11), frame(12)
        first = await c.put(first_df, peer=small.peer_id)
        assert not list(spill.glob("*.ref"))  # it fits in memory
        second = await c.put(second_df, peer=small.peer_id)  # 2 x 3.2 MB > 5 MiB
        files = list(spill.glob("*.ref"))
        assert len(files) == 1 and files[0].stat().st_size == first.size  # the older one
        fut = c.submit(column_total, first, "a")
        assert await fut == pytest.approx(float(first_df["a"].sum()))  # read from disk
        assert fut.peer == small.peer_id
        assert await c.submit(column_total, second, "b") == float(second_df["b"].sum())

        # Memory and spill folder both full: refused, nothing dropped, the owner keeps it.
        with pytest.raises(RefError) as full:
            await c.put(third_df, peer=small.peer_id)
        assert full.value.reason == Reason.STORE_FULL and "does not fit" in full.value.message
        assert len(list(spill.glob("*.ref"))) == 1
        pd.testing.assert_frame_equal(await first.fetch(), first_df)
        third = await c.put(third_df, peer=roomy.peer_id)
        assert await c.submit(column_total, third, "b") == float(third_df["b"].sum())
        assert await c.submit(column_total, first, "b") == float(first_df["b"].sum())

        await first.release()
        await until(lambda: not list(spill.glob("*.ref")), "the spill file deleted")
        assert await c.submit(column_total, second, "a") == pytest.approx(second_df["a"].sum())
    finally:
        await c.leave()
        await asyncio.gather(small.stop(), roomy.stop())
    assert small.problems() == [] and roomy.problems() == []
