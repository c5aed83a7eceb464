"""No whole-message copies on the way (issue 12 item 4), checked by allocation, not time.

``tracemalloc`` sees what Python and numpy allocate (bytes, bytearrays, frames), not
Arrow's own pool: every copy these tests guard against (msgpack joining a message,
decoding binaries out of it, ``b"".join``, ``readexactly``) is a Python allocation of the
frame's size, so each one that came back would add 1x the frame to a peak bounded here.
The RSS of a real worker is measured by ``swarm-notebook bench`` (too noisy for a test on
a shared machine).
"""

from __future__ import annotations

import gc
import mmap
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import numpy as np
import pandas as pd

from swarm_notebook.bench.data_frames import df50, frame_bytes
from swarm_notebook.protocol import oob
from swarm_notebook.protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope_parts,
)
from swarm_notebook.protocol.framing import Reassembler, frame_message
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.workload.delegator import WireData
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool

ROWS = 800_000  # 4 float64 columns: 25.6 MB


class Peak:
    """The most Python held above the start of the ``with`` block, in bytes."""

    value = 0


@contextmanager
def traced() -> Iterator[Peak]:
    peak = Peak()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        yield peak
        peak.value = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def _through_a_link(body: Any) -> bytes | bytearray:
    """Chunk ``body``'s envelope and reassemble it the way one mesh link does."""
    env = Envelope(v=PROTOCOL_VERSION, type="task.execute", id="t", body=body)
    reassembler = Reassembler()
    payload = None
    for frame in frame_message(encode_envelope_parts(env), transfer_id=1):
        payload = reassembler.feed(frame, 0.0) or payload
    assert payload is not None
    return payload


def test_sending_a_frame_copies_no_more_than_a_chunk() -> None:
    frame = df50(ROWS)
    size = frame_bytes(frame)
    wire = {"inputs": {"df": encode_value(frame)}}  # Arrow's pool: not traced
    sent = 0
    env = Envelope(v=PROTOCOL_VERSION, type="task.execute", id="t", body=wire)
    with traced() as peak:
        for chunk in frame_message(encode_envelope_parts(env), transfer_id=1):
            sent += len(chunk)  # each chunk freed before the next, as on a link
    assert sent > size
    # Before: msgpack copied the Arrow stream into one message (1x) on the sender.
    assert peak.value < 0.1 * size, f"{peak.value / size:.2f}x the frame"


def test_a_sent_buffer_is_freed_once_sent_without_waiting_for_the_collector() -> None:
    # The walk that picks out large binaries was a recursive closure: a reference cycle
    # that kept every frame it sent alive until the cyclic collector ran.
    buffer = bytearray(4 * 2**20)
    gc.disable()
    try:
        env = Envelope(v=PROTOCOL_VERSION, type="t", id="t", body={"data": memoryview(buffer)})
        for _ in frame_message(encode_envelope_parts(env), transfer_id=1):
            pass
        del env
        buffer.append(0)  # BufferError while a view of it is still alive
    finally:
        gc.enable()


def test_receiving_a_frame_holds_it_once_plus_the_decoded_frame() -> None:
    frame = df50(ROWS)
    size = frame_bytes(frame)
    wire = {"inputs": {"df": encode_value(frame)}}
    with traced() as peak:
        payload = _through_a_link(wire)
        env = decode_envelope(payload, max_size=2**30)
        del payload
        back = decode_value(env.body["inputs"]["df"])
    assert isinstance(back, pd.DataFrame) and back.equals(frame)
    # The reassembly buffer (1x) and the decoded frame (1x); decoding the envelope copied
    # the binary out of the buffer (+1x) before.
    assert peak.value < 2.3 * size, f"{peak.value / size:.2f}x the frame"
    assert isinstance(env.body["inputs"]["df"]["data"], memoryview)  # of that buffer


async def test_the_sandbox_hop_holds_the_result_once_in_the_pool() -> None:
    frame = df50(ROWS)
    size = frame_bytes(frame)
    pool = PythonSandboxPool(size=1, memory_limit_mb=1024)
    await pool.start()
    try:
        ctx = TaskContext(task_id="t-1", delegator="peer-a")
        warm = await pool.run({"code": "df", "inputs": {"df": encode_value(frame[:10])}}, ctx)
        assert warm["success"], warm
        data = {"code": "df", "inputs": {"df": encode_value(frame)}}
        with traced() as peak:
            result = await pool.run(data, ctx)
        assert result["success"], result
        # Nothing: the result is the child's sealed memfd, mapped here. Before, the pool
        # read it into a buffer (1x); before that, the request was packed into one
        # message and the result gathered, copied out and decoded: 4x and more.
        assert peak.value < 0.1 * size, f"{peak.value / size:.2f}x the frame"
        data = result["value"]["data"]
        assert isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap)
        assert decode_value(result["value"]).equals(frame)
    finally:
        await pool.close()


def test_a_delegator_gives_large_encoded_inputs_away_and_encodes_them_again_to_retry() -> None:
    encodings: list[int] = []

    def encode() -> dict[str, Any]:
        encodings.append(1)
        return {"inputs": {"df": encode_value(df50(100_000))}}

    big = WireData(encode(), encode)
    first = big.take()
    assert big._first is None  # the holder keeps no reference to what it gave away
    again = big.take()
    assert len(encodings) == 2 and again is not first
    small = WireData({"inputs": {"x": encode_value(3)}}, encode)
    assert small.take() is small.take()  # small data is reused, never encoded again
    assert len(encodings) == 2


def test_a_received_frame_is_decoded_in_place_and_stays_editable() -> None:
    frame = df50(ROWS)
    size = frame_bytes(frame)
    wire = {"value": encode_value(frame)}
    payload = _through_a_link(wire)
    assert isinstance(payload, bytearray)  # the link's own reassembly buffer
    with traced() as peak:
        env = decode_envelope(payload, max_size=2**30, owned=True)
        back = decode_value(env.body["value"], exclusive=True)
    assert back.equals(frame)
    # Nothing but bookkeeping: the numeric columns are views of the received buffer.
    assert peak.value < 0.05 * size, f"{peak.value / size:.2f}x the frame"
    buffer = np.frombuffer(payload, dtype=np.uint8)
    for name in back.columns:
        column = back[name].to_numpy()
        assert np.shares_memory(column, buffer) and column.ctypes.data % 8 == 0
    back.iloc[0, 0] = -1.0  # pandas writes into an unreferenced block in place
    back.loc[back["b"] > 0.5, "c"] = 0.0
    back.fillna(0.0, inplace=True)
    assert back.iloc[0, 0] == -1.0 and (back.loc[back["b"] > 0.5, "c"] == 0.0).all()


def test_a_frame_decoded_from_a_buffer_not_handed_over_is_a_copy() -> None:
    frame = df50(10_000)
    payload = _through_a_link({"value": encode_value(frame)})
    env = decode_envelope(payload, max_size=2**30)  # not owned: read-only views
    back = decode_value(env.body["value"], exclusive=True)
    assert not np.shares_memory(back["a"].to_numpy(), np.frombuffer(payload, np.uint8))
    back.iloc[0, 0] = -1.0
    assert back.iloc[0, 0] == -1.0


def test_two_values_a_peer_points_at_the_same_bytes_never_alias() -> None:
    stream = encode_value(df50(10_000))["data"]
    ref = msgspec.msgpack.Ext(oob.EXT_CODE, struct.pack(">QQ", 0, stream.nbytes))
    head = msgspec.msgpack.encode({n: {"__sn__": "df", "data": ref} for n in ("a", "b")})
    message = bytearray(struct.pack(">BI", oob.MARK, len(head)) + head + bytes(stream))
    body = oob.decode(message, oob.plain_decoder(), owned=True)
    a = decode_value(body["a"], exclusive=True)
    b = decode_value(body["b"], exclusive=True)
    a.iloc[0, 0] = -1.0
    assert b.iloc[0, 0] != -1.0  # the second reference was read-only: b is a copy


def test_a_wide_frame_is_decoded_into_consolidated_blocks_not_one_per_column() -> None:
    # One block per column would make pandas warn "highly fragmented" on every insert.
    wide = pd.DataFrame(np.random.default_rng(1).random((1_000, 80)))
    wide.columns = [f"c{i}" for i in range(80)]
    payload = _through_a_link({"value": encode_value(wide)})
    env = decode_envelope(payload, max_size=2**30, owned=True)
    back = decode_value(env.body["value"], exclusive=True)
    assert back.equals(wide)
    assert len(back._mgr.blocks) == 1
    assert not np.shares_memory(back["c0"].to_numpy(), np.frombuffer(payload, np.uint8))
    back["extra"] = 1.0
    assert back["extra"].sum() == 1_000
