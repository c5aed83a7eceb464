"""The parts of a Dask-backed worker: resizable slots, map cells, splitting and joining,
the card's backend, and the executor on a real LocalCluster in this process's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from swarm_notebook._util.slots import Slots
from swarm_notebook.errors import TaskRefused, UsageError
from swarm_notebook.identity import Identity
from swarm_notebook.membership.agent_card import make_card, verify_card
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.executors.dask_cluster import DaskCluster, parse_dask_address
from swarm_notebook.workload.executors.dask_task import DaskTaskExecutor, _joined
from swarm_notebook.workload.sandbox.pool import PythonTaskData
from swarm_notebook.workload.source import ARGS_NAME, is_map_cell, ship_function

pytestmark = pytest.mark.timeout(120)


def shout(word: str) -> str:
    print("got", word)
    return word.upper()


# -- slots -------------------------------------------------------------------------------


async def test_slots_grow_at_once_and_shrink_as_holders_release() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.resize(2)  # a cluster that scaled up: the waiter runs now
    await asyncio.wait_for(waiter, 1)
    assert slots.used == 2
    slots.resize(1)
    third = asyncio.ensure_future(slots.acquire())
    slots.release()  # 1 used of 1: still full
    await asyncio.sleep(0)
    assert not third.done()
    slots.release()
    await asyncio.wait_for(third, 1)
    assert slots.used == 1


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release()
    assert slots.used == 0
    await asyncio.wait_for(slots.acquire(), 1)


# -- map cells, addresses, cards -------------------------------------------------------


def test_only_an_unchanged_map_cell_is_split() -> None:
    shipped = ship_function(shout)
    assert is_map_cell(shipped.map_cell())
    assert not is_map_cell(shipped.cell())
    assert not is_map_cell("print('once')\n" + shipped.map_cell())
    assert not is_map_cell(shipped.map_cell().replace("]\n", " if __item]\n"))
    assert not is_map_cell("[f(*__item) for __item in __swarm_args__] +")


def test_dask_addresses() -> None:
    assert parse_dask_address("local:2") == (None, 2)
    assert parse_dask_address("tcp://10.1.2.3:8786") == ("tcp://10.1.2.3:8786", 0)
    for bad in ("local:0", "local:x", "10.1.2.3:8786", "http://x:8786"):
        with pytest.raises(UsageError) as caught:
            parse_dask_address(bad)
        assert caught.value.reason == Reason.BAD_ARGUMENTS


def test_the_backend_is_signed_on_the_card(tmp_path: object) -> None:
    me = Identity.generate()
    card = make_card(me, name="w", version="1", capabilities=["python-execution"],
                     concurrency=8, limits={}, seq=1, isolation="none", backend="dask")  # fmt: skip
    assert verify_card(card, me.peer_id).backend == "dask"
    forged = msgspec.structs.replace(card, backend="sandbox")
    with pytest.raises(Exception) as caught:
        verify_card(forged, me.peer_id)
    assert getattr(caught.value, "reason", None) == Reason.BAD_SIGNATURE


# -- splitting and joining ---------------------------------------------------------------


def _chunk(n: int) -> PythonTaskData:
    items = encode_value([[f"w{i}"] for i in range(n)])
    return PythonTaskData(code=ship_function(shout).map_cell(), inputs={ARGS_NAME: items})


def test_a_map_chunk_is_split_in_order_over_the_clusters_threads() -> None:
    cluster = DaskCluster("local:3")
    cluster.nthreads = 3  # as the scheduler would report it
    executor = DaskTaskExecutor(cluster)
    parts = executor._parts(_chunk(10))
    assert [len(p[ARGS_NAME]) for p in parts] == [4, 3, 3]
    joined = [item for p in parts for item in p[ARGS_NAME]]
    assert decode_value(joined) == [[f"w{i}"] for i in range(10)]
    assert len(executor._parts(_chunk(1))) == 1
    plain = PythonTaskData(code="x = 1\nx", inputs={})
    assert executor._parts(plain) == [{}]


def test_parts_join_like_one_run_and_stop_at_the_first_failure() -> None:
    ok = {"success": True, "value": [1, 2], "outputs": {}, "stdout": "a\n", "stderr": ""}
    ok2 = {"success": True, "value": [3], "outputs": {}, "stdout": "b\n", "stderr": "e"}
    bad = {"success": False, "error_type": "remote-exception", "error": "ValueError: x",
           "traceback": "Traceback...", "stdout": "c\n", "stderr": ""}  # fmt: skip
    assert _joined([ok, ok2]) == {
        "success": True, "value": [1, 2, 3], "outputs": {}, "stdout": "a\nb\n", "stderr": "e",
    }  # fmt: skip
    failed = _joined([ok, bad, ok2])
    assert failed["success"] is False and failed["error"] == "ValueError: x"
    assert failed["stdout"] == "a\nc\n"


# -- the executor on a real cluster ------------------------------------------------------


@pytest.fixture
async def executor() -> AsyncIterator[DaskTaskExecutor]:
    ex = DaskTaskExecutor(DaskCluster("local:2"), allowed=lambda peer: peer == "friend")
    await ex.start()
    try:
        yield ex
    finally:
        await ex.close()


async def test_the_executor_streams_output_times_out_and_refuses_strangers(
    executor: DaskTaskExecutor,
) -> None:
    assert executor.capacity == 2
    live: list[list[tuple[str, str]]] = []
    ctx = TaskContext(task_id="t1", delegator="friend", on_output=live.append)
    words = [f"w{i}" for i in range(6)]
    data = {"code": ship_function(shout).map_cell(),
            "inputs": {ARGS_NAME: encode_value([[w] for w in words])}}  # fmt: skip
    result = await executor.run(data, ctx)
    assert result["success"] and decode_value(result["value"]) == [w.upper() for w in words]
    assert result["stdout"] == "".join(f"got {w}\n" for w in words)
    streamed = "".join(text for batch in live for stream, text in batch if stream == "stdout")
    assert sorted(streamed.splitlines()) == sorted(result["stdout"].splitlines())
    assert result["backend_attempts"] == 1 and executor.stats()["split_chunks"] == 1

    slow = {"code": "import time\ntime.sleep(20)", "timeout": 0.5}
    timed_out = await executor.run(slow, TaskContext(task_id="t2", delegator="friend"))
    assert timed_out["error_type"] == Reason.TIMEOUT
    processing = await executor.cluster.client.processing()
    assert not any(processing.values())  # the Dask task was cancelled, not left running

    with pytest.raises(TaskRefused) as refused:
        await executor.run({"code": "1"}, TaskContext(task_id="t3", delegator="stranger"))
    assert refused.value.reason == Reason.NOT_ON_ALLOWLIST
    with pytest.raises(TaskRefused) as session:
        await executor.run({"code": "1", "session": "s"}, ctx)
    assert session.value.reason == Reason.BAD_INPUT


async def test_capacity_follows_the_cluster_as_it_scales(executor: DaskTaskExecutor) -> None:
    changes: list[int] = []
    executor.cluster.on_change(lambda: changes.append(executor.capacity))
    cluster = executor.cluster._cluster
    assert cluster is not None
    cluster.scale(3)
    deadline = asyncio.get_running_loop().time() + 60
    while executor.capacity != 3:
        assert asyncio.get_running_loop().time() < deadline, changes
        await asyncio.sleep(0.05)
    assert changes[-1] == 3


async def test_output_printed_before_a_pause_is_relayed_during_it(
    executor: DaskTaskExecutor,
) -> None:
    arrived = asyncio.Event()
    live: list[str] = []

    def on_output(chunks: list[tuple[str, str]]) -> None:
        live.extend(text for _, text in chunks)
        if "second" in "".join(live):
            arrived.set()

    ctx = TaskContext(task_id="t4", delegator="friend", on_output=on_output)
    code = "import time\nprint('first')\nprint('second')\ntime.sleep(5)\n1"
    run = asyncio.ensure_future(executor.run({"code": code}, ctx))
    try:
        await asyncio.wait_for(arrived.wait(), 4)  # long before the task ends
        assert not run.done()
    finally:
        result = await run
    assert result["stdout"] == "first\nsecond\n" and "".join(live) == result["stdout"]


async def test_a_big_input_is_scattered_and_arrives_intact(executor: DaskTaskExecutor) -> None:
    import pandas as pd

    df = pd.DataFrame({"v": range(200_000)})
    ctx = TaskContext(task_id="t5", delegator="friend")
    data = {"code": "float(df.v.sum())", "inputs": {"df": encode_value(df)}}
    result = await executor.run(data, ctx)
    assert decode_value(result["value"]) == float(df.v.sum())
    assert executor.stats()["scattered_inputs"] == 1


async def test_the_same_big_input_is_scattered_once_and_reused_by_later_tasks(
    executor: DaskTaskExecutor,
) -> None:
    """A ref used by many tasks arrives as the same bytes each time: it stays on the
    cluster as one scattered future instead of travelling again."""
    import pandas as pd

    before = executor.stats()
    df = pd.DataFrame({"v": range(300_000)})
    ctx = TaskContext(task_id="t6", delegator="friend")
    encoded = encode_value(df)
    for code, expected in (("float(df.v.sum())", float(df.v.sum())), ("len(df)", len(df))):
        result = await executor.run({"code": code, "inputs": {"df": encoded}}, ctx)
        assert decode_value(result["value"]) == expected
    after = executor.stats()
    assert after["scattered_inputs"] - before["scattered_inputs"] == 1
    assert after["reused_scattered_inputs"] - before["reused_scattered_inputs"] == 1
    other = pd.DataFrame({"v": range(300_001)})  # different bytes: scattered anew
    result = await executor.run(
        {"code": "len(df)", "inputs": {"df": encode_value(other)}}, ctx
    )
    assert decode_value(result["value"]) == 300_001
    assert executor.stats()["scattered_inputs"] - before["scattered_inputs"] == 2


async def test_scattered_inputs_keep_a_bounded_number_of_bytes(
    executor: DaskTaskExecutor,
) -> None:
    from swarm_notebook.workload.executors.dask_inputs import ScatteredInputs

    await executor.start()
    client = executor.cluster.client
    cache = ScatteredInputs(max_bytes=3_000)
    first = await cache.place(client, b"a" * 1_000)
    assert await cache.place(client, b"a" * 1_000) is first
    await cache.place(client, b"b" * 1_000)
    await cache.place(client, b"c" * 1_000)  # over the budget: the oldest ("a") goes
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= 3_000
    again = await cache.place(client, b"a" * 1_000)
    assert again is not first and await again == b"a" * 1_000
    assert cache.stats()["scattered"] == 4 and cache.stats()["reused"] == 1
