"""Round trips and refusals of the safe value codec (no pickle across trust boundaries)."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pytest

from swarm_notebook.errors import ValueCodecError
from swarm_notebook.protocol.values import TAG, decode_value, encode_value


def wire_round_trip(obj: Any, **kwargs: Any) -> Any:
    """Encode, send through real msgpack bytes, decode: what a peer would see."""
    encoded = encode_value(obj, **kwargs)
    raw = msgspec.msgpack.encode(encoded)
    return decode_value(msgspec.msgpack.decode(raw), **kwargs)


def rich_frame(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i32": np.arange(n, dtype="int32"),
            "f": np.linspace(0.0, 1.0, n),
            "s": [f"row{i}" for i in range(n)],
            "obj": np.array(["a", None] + ["c"] * (n - 2), dtype=object),
            "cat": pd.Categorical(["x", "y"] * (n // 2), categories=["y", "x"], ordered=True),
            "when": pd.date_range("2024-03-30", periods=n, freq="h", tz="Europe/Paris"),
            "nullable": pd.array([1, None] + [3] * (n - 2), dtype="Int64"),
            "flag": pd.array([True, None] + [False] * (n - 2), dtype="boolean"),
            "span": pd.to_timedelta(np.arange(n), unit="s"),
        },
        index=pd.Index([10 * i for i in range(n)], name="key"),
    )


def test_dataframe_round_trip_keeps_dtypes_index_and_names() -> None:
    df = rich_frame()
    out = wire_round_trip(df)
    pd.testing.assert_frame_equal(out, df)


def test_multiindex_named_columns_and_freq_round_trip() -> None:
    df = rich_frame().reset_index().set_index(["s", "key"])
    pd.testing.assert_frame_equal(wire_round_trip(df), df)
    cols = pd.DataFrame(
        np.ones((2, 2)),
        columns=pd.MultiIndex.from_tuples([("a", 1), ("a", 2)], names=["top", "sub"]),
    )
    pd.testing.assert_frame_equal(wire_round_trip(cols), cols)
    daily = pd.DataFrame(
        {"v": [1.5, 2.5, 3.5]}, index=pd.date_range("2024-01-01", periods=3, name="day")
    )
    pd.testing.assert_frame_equal(wire_round_trip(daily), daily)
    obj_index = pd.DataFrame({"v": [1, 2]}, index=pd.Index(["p", "q"], dtype=object, name="n"))
    pd.testing.assert_frame_equal(wire_round_trip(obj_index), obj_index)


def test_series_index_and_pandas_scalars_round_trip() -> None:
    s = pd.Series(pd.array([1, None, 3], dtype="Int64"), index=list("abc"), name=("m", 1))
    pd.testing.assert_series_equal(wire_round_trip(s), s)
    unnamed = pd.Series([0.5, 1.5])
    pd.testing.assert_series_equal(wire_round_trip(unnamed), unnamed)
    idx = pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["x", "y"])
    pd.testing.assert_index_equal(wire_round_trip(idx), idx)
    ts = pd.Timestamp("2024-05-01 12:00:00.123456789", tz="UTC")
    assert wire_round_trip(ts) == ts
    assert wire_round_trip(pd.Timedelta("3s")) == pd.Timedelta("3s")


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype="int16").reshape(3, 4),
        np.linspace(0, 1, 7, dtype="float32"),
        np.array([1 + 2j, 3 - 1j]),
        np.array([True, False]),
        np.array(["ab", "cde"]),
        np.array(["2024-01-01", "NaT"], dtype="datetime64[ns]"),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.zeros((0, 3), dtype="uint64"),
    ],
)
def test_numpy_arrays_round_trip(arr: np.ndarray) -> None:
    out = wire_round_trip(arr)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_numpy_scalar_keeps_its_dtype() -> None:
    out = wire_round_trip(np.float32(1.25))
    assert type(out) is np.float32 and out == np.float32(1.25)
    assert type(wire_round_trip(np.int64(7))) is np.int64


def test_nested_plain_values_tuples_sets_and_odd_keys() -> None:
    value = {
        "name": "run",
        "n": [1, 2.5, None, True, b"\x00raw"],
        "nested": {"deep": [{"x": 1}]},
        "pair": (1, ("a", 2)),
        "tags": {"a", "b"},
        "frozen": frozenset({1}),
        "by_id": {1: "one", (2, 3): "pair"},
        "huge": 2**80,
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        "day": dt.date(2024, 2, 29),
        "wait": dt.timedelta(days=1, microseconds=5),
    }
    assert wire_round_trip(value) == value
    assert type(wire_round_trip(value)["frozen"]) is frozenset


def test_user_dict_with_the_tag_key_is_escaped_not_misread() -> None:
    sneaky = {TAG: "pickle", "data": b"cos\nsystem\n(S'echo hacked'\ntR."}
    encoded = encode_value(sneaky)
    assert encoded[TAG] == "dict"
    assert wire_round_trip(sneaky) == sneaky
    assert wire_round_trip({"outer": {TAG: "df"}}) == {"outer": {TAG: "df"}}


def test_unsupported_types_are_refused_with_a_helpful_message() -> None:
    with pytest.raises(ValueCodecError) as info:
        encode_value({"x": decimal.Decimal("1.5")})
    assert info.value.reason == "unsupported-type"
    assert "decimal.Decimal" in str(info.value) and "allow_pickle" in str(info.value)
    with pytest.raises(ValueCodecError, match="dtype object"):
        encode_value(np.array([1, "x"], dtype=object))
    with pytest.raises(ValueCodecError, match="duplicate column"):
        encode_value(pd.DataFrame([[1, 2]], columns=["a", "a"]))
    with pytest.raises(ValueCodecError, match="Arrow cannot store"):
        encode_value(pd.DataFrame({"mixed": [1, "x"]}))


def test_pickle_needs_consent_on_both_sides() -> None:
    value = decimal.Decimal("2.5")
    encoded = encode_value(value, allow_pickle=True)
    assert encoded[TAG] == "pickle"
    with pytest.raises(ValueCodecError) as info:
        decode_value(encoded)
    assert info.value.reason == "pickle-refused"
    assert "trust" in info.value.message
    assert decode_value(encoded, allow_pickle=True) == value


def test_size_and_depth_limits() -> None:
    with pytest.raises(ValueCodecError) as info:
        encode_value(np.zeros(10_000), max_bytes=50_000)
    assert info.value.reason == "too-large"
    with pytest.raises(ValueCodecError) as info:
        encode_value(["x" * 1000] * 100, max_bytes=50_000)
    assert info.value.reason == "too-large"
    big = encode_value(pd.DataFrame({"a": np.zeros(100_000)}))
    with pytest.raises(ValueCodecError) as info:
        decode_value(big, max_bytes=10_000)
    assert info.value.reason == "too-large"
    deep: list[object] = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueCodecError) as info:
        encode_value(deep)
    assert info.value.reason == "too-deep"


@pytest.mark.parametrize(
    "bad",
    [
        {TAG: "df", "data": b"not arrow"},
        {TAG: "df"},
        {TAG: "ndarray", "data": b"\x93NUMPY garbage"},
        {TAG: "ndarray", "data": "text"},
        {TAG: "npscalar", "data": encode_value(np.arange(3))["data"]},
        {TAG: "series", "data": encode_value(pd.DataFrame({"a": [1], "b": [2]}))["data"]},
        {TAG: "tuple", "items": 5},
        {TAG: "set", "type": "list", "items": []},
        {TAG: "set", "type": "set", "items": [[1]]},
        {TAG: "map", "items": [[1]]},
        {TAG: "map", "items": [[[1], 2]]},
        {TAG: "bigint", "data": "12x"},
        {TAG: "datetime", "type": "datetime", "data": "yesterday"},
        {TAG: "no-such-kind"},
        {TAG: 5},
        {1: "int key in a plain dict"},
        {TAG: "dict", "items": [1, 2]},
    ],
)
def test_malformed_tagged_values_raise_only_value_codec_error(bad: object) -> None:
    with pytest.raises(ValueCodecError) as info:
        decode_value(bad)
    assert info.value.reason in {"malformed", "too-large", "too-deep"}
