"""The compression decision and bounded decoding of compressed Arrow streams."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from swarm_notebook.errors import ValueCodecError
from swarm_notebook.protocol.compression import Compression, choose_codec
from swarm_notebook.protocol.values import TAG, DecodeBudget, decode_value, encode_value
from swarm_notebook.transport.throughput import ThroughputEstimate

MB = 1024 * 1024
SLOW = 30e6  # aiortc between two processes


def realistic(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "city": pd.Categorical(rng.choice(["Paris", "Berlin", "Rome", "Oslo"], rows)),
            "count": rng.integers(0, 100, rows),
            "price": np.round(rng.random(rows) * 100, 2),
            "when": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(rng.integers(0, 86400 * 365, rows), unit="s"),
        }
    )


def random_floats(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    return pd.DataFrame({c: rng.random(rows) for c in "abcd"})


def test_a_compressible_frame_is_compressed_for_a_slow_link() -> None:
    table = pa.Table.from_pandas(realistic(200_000))
    choice = choose_codec(table, Compression(SLOW))
    assert choice.codec == "lz4"
    assert choice.saving is not None and choice.saving >= 0.10
    assert choose_codec(table, Compression(SLOW, codec="zstd")).codec == "zstd"


def test_random_floats_are_never_compressed() -> None:
    choice = choose_codec(pa.Table.from_pandas(random_floats(200_000)), Compression(SLOW))
    assert choice.codec is None
    assert choice.why == "incompressible"


def test_a_link_faster_than_the_codec_gets_plain_bytes() -> None:
    table = pa.Table.from_pandas(realistic(200_000))
    choice = choose_codec(table, Compression(1e13))  # 10 TB/s: no codec keeps up
    assert choice.codec is None
    assert choice.why == "link faster than codec"


def test_no_link_cost_small_tables_and_off_send_plain() -> None:
    table = pa.Table.from_pandas(realistic(200_000))
    assert choose_codec(table, Compression(None)).why == "no link cost"
    assert choose_codec(table, Compression(SLOW, codec=None)).why == "off"
    assert choose_codec(table.slice(0, 100), Compression(SLOW)).why == "small"
    with pytest.raises(ValueError, match="codec"):
        Compression(SLOW, codec="gzip")


def test_a_compressed_frame_round_trips_smaller() -> None:
    frame = realistic(200_000)
    plain = encode_value(frame)
    packed = encode_value(frame, compression=Compression(SLOW))
    assert len(packed["data"]) < 0.8 * len(plain["data"])
    assert decode_value(packed).equals(frame)
    floats = random_floats(100_000)
    assert len(encode_value(floats, compression=Compression(SLOW))["data"]) == len(
        encode_value(floats)["data"]
    )


def test_the_link_estimate_starts_at_the_prior_and_follows_large_transfers() -> None:
    est = ThroughputEstimate(prior=30e6)
    assert est.bytes_per_s == 30e6
    est.add(1000, 0.001)  # a small message measures latency: ignored
    assert est.samples == 0
    est.add(100 * MB, 1.0)
    assert est.bytes_per_s == pytest.approx(100 * MB)
    est.add(50 * MB, 1.0)
    assert 50 * MB < est.bytes_per_s < 100 * MB


def _zeros_stream(nbytes: int) -> tuple[bytes, int]:
    """An lz4 Arrow stream of ``nbytes`` zeros (a few kB) and where its size is declared."""
    table = pa.table({"z": np.zeros(nbytes // 8, dtype="int64")})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    at = data.find(struct.pack("<q", nbytes))
    assert at > 0 and len(data) < nbytes // 100
    return data, at


def _decode_in_pool(data: bytes, budget: DecodeBudget) -> tuple[ValueCodecError | None, int]:
    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    pa.set_memory_pool(pool)
    error = None
    try:
        decode_value({TAG: "df", "data": data}, budget=budget)
    except ValueCodecError as exc:
        error = exc
    finally:
        pa.set_memory_pool(previous)
    return error, pool.max_memory()


def test_a_bomb_declared_small_never_inflates_past_its_declaration() -> None:
    data, at = _zeros_stream(64 * MB)
    forged = bytearray(data)
    forged[at : at + 8] = struct.pack("<q", MB)  # "1 MB once inflated"; it holds 64 MB
    error, peak = _decode_in_pool(bytes(forged), DecodeBudget(8 * MB))
    assert error is not None and error.reason == "malformed"
    assert peak <= 8 * MB


def test_a_bomb_declared_large_is_too_large_before_inflating() -> None:
    data, _ = _zeros_stream(64 * MB)
    error, peak = _decode_in_pool(data, DecodeBudget(8 * MB))
    assert error is not None and error.reason == "too-large"
    assert peak == 0  # refused from the headers: nothing was decompressed


def test_a_corrupt_compressed_buffer_is_malformed() -> None:
    data = encode_value(realistic(50_000), compression=Compression(SLOW))["data"]
    corrupt = bytearray(data)
    middle = len(corrupt) // 2
    corrupt[middle : middle + 64] = bytes(range(64))
    error, peak = _decode_in_pool(bytes(corrupt), DecodeBudget(64 * MB))
    assert error is not None and error.reason in {"malformed"}
    assert peak <= 64 * MB
