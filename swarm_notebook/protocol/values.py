"""Safe encoding of Python values that cross a peer boundary (task inputs, outputs, results).

The output of :func:`encode_value` is built only from ``None``, ``bool``, ``int``, ``float``,
``str``, ``bytes``, ``list`` and ``dict`` with ``str`` keys, so msgpack carries it as is and
nothing on the receiving side ever runs code to rebuild it. Special values are tagged
dicts ``{"__sn__": <kind>, ...}``:

============  ================================================================
kind          value
============  ================================================================
``df``        pandas DataFrame as Arrow IPC stream bytes (dtypes, index, names kept)
``series``    pandas Series, the same way, plus its encoded ``name``
``index``     pandas Index / MultiIndex, the same way
``ndarray``   numpy array as ``.npy`` bytes (``allow_pickle=False``; no object arrays)
``npscalar``  numpy scalar (``np.int64(3)``) as a 0-d ``.npy``, decoded to a numpy scalar
``tuple``     tuple, ``items`` a list; decoded to a tuple
``set``       set / ``frozenset``, ``items`` a list in arbitrary order; decoded to the
              same type
``map``       dict with non-``str`` keys, ``items`` a list of ``[key, value]`` pairs
``dict``      a user dict that itself has a ``"__sn__"`` key (escaped so it is never
              misread as a tag)
``bigint``    an int outside the 64-bit range, as decimal text
``datetime``  ``datetime``/``date``/``time``/``timedelta``, as ISO text or microseconds
``pdscalar``  ``pandas.Timestamp`` / ``Timedelta`` (unit and time zone kept), via Arrow
``pickle``    anything else, only when both sides pass ``allow_pickle=True``
============  ================================================================

Decoding is bounded: a :class:`DecodeBudget` (one per message, shared by a result and all
its outputs) is charged from the sizes each Arrow stream and ``.npy`` header *declares*
(see ``declared_sizes``) before anything is decompressed or allocated; passing it is
``too-large``.

Subclasses of ``str``/``int``/``float``/``bytes`` (enums, ``numpy.str_``) arrive as the
plain base type. In object-dtype DataFrame columns, missing values arrive as ``None``
(Arrow has one null, so ``NaN`` and ``None`` are not told apart there).

Example::

    >>> import pandas as pd
    >>> wire = encode_value({"df": pd.DataFrame({"a": [1, 2]}), "k": (1, 2)})
    >>> decode_value(wire)["k"]
    (1, 2)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import mmap
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as pa_ipc
from pandas.api.types import is_object_dtype

from swarm_notebook.errors import ValueCodecError
from swarm_notebook.protocol.compression import Compression, choose_codec, ipc_size, write_options
from swarm_notebook.protocol.declared_sizes import arrow_stream_cost, load_npy
from swarm_notebook.reasons import Reason

TAG = "__sn__"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 64
_META_KEY = b"swarm_notebook"
_SCALAR_COST = 9  # a msgpack scalar or container header is at most 9 bytes
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1
# Streams at least this large get an anonymous mapping of their own (see ``allocate``).
MMAP_MIN_BYTES = 1 << 20
# A frame decoded in place has one pandas block per column; past 100 blocks pandas warns
# that it is "highly fragmented" on every column insert, so wider frames are copied into
# consolidated blocks as before.
MAX_SPLIT_COLUMNS = 64
# Gives a writable buffer (buffer protocol) of the size asked for.
Allocator = Callable[[int], Any]


def encode_value(
    obj: Any,
    *,
    allow_pickle: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    compression: Compression | None = None,
    allocator: Allocator | None = None,
) -> Any:
    """Turn ``obj`` into a msgpack-friendly structure that :func:`decode_value` rebuilds.

    Raises :class:`ValueCodecError` for types without a safe encoding (unless
    ``allow_pickle``) and when the encoded size would pass ``max_bytes``. With
    ``compression``, each table's Arrow buffers are compressed when a sample says it pays
    on that link (see ``protocol/compression.py``). Arrow and npy payloads are
    ``memoryview``s over the writer's buffer (msgpack sends them as bytes): no extra copy.
    ``allocator(size)`` gives the writable buffer an uncompressed Arrow stream of at least
    ``MMAP_MIN_BYTES`` is written into (the sandbox child writes its results straight
    into shared memory).
    """
    encoder = _Encoder(
        allow_pickle=allow_pickle,
        max_bytes=max_bytes,
        compression=compression,
        allocator=allocator,
    )
    return encoder.encode(obj, 0)


class DecodeBudget:
    """The memory one message may make us hold once decoded, shared by all its values.

    A result and every one of its outputs draw on one budget, and each Arrow table or
    numpy array is charged from its declared sizes *before* it is decompressed or
    allocated, so a small compressed message can never expand past ``max_bytes``.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def charge(self, n: int) -> None:
        if self.used + n > self.max_bytes:
            raise ValueCodecError(
                Reason.TOO_LARGE,
                f"decoding would hold {self.used + n} bytes, over the limit of "
                f"{self.max_bytes} bytes for one message",
            )
        self.used += n


def decode_value(
    x: Any,
    *,
    allow_pickle: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    budget: DecodeBudget | None = None,
    exclusive: bool = False,
) -> Any:
    """Rebuild a value made by :func:`encode_value`; every failure is a ``ValueCodecError``.

    ``budget`` (or a fresh one of ``max_bytes``) bounds the memory that decoded tables
    and arrays may take; pass one budget to every value of one message.

    With ``exclusive`` the caller hands ``x``'s binaries over: nothing reads them after
    this. A DataFrame's numeric columns without nulls then keep a *writable* view of a
    writable binary (a received message's own buffer, ``oob.parse(owned=True)``) as
    their memory instead of a copy of it, so decoding a 50 MB frame allocates nothing
    and in-place edits keep working. Read-only binaries are copied as always.
    """
    decoder = _Decoder(
        allow_pickle=allow_pickle,
        budget=budget or DecodeBudget(max_bytes),
        exclusive=exclusive,
    )
    try:
        return decoder.decode(x, 0)
    except ValueCodecError:
        raise
    except Exception as exc:  # a crafted value must never surface as another error type
        raise ValueCodecError(Reason.MALFORMED, f"{type(exc).__name__}: {exc}"[:300]) from exc


class _Encoder:
    def __init__(
        self,
        *,
        allow_pickle: bool,
        max_bytes: int,
        compression: Compression | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        self.allocator = allocator
        self.allow_pickle = allow_pickle
        self.max_bytes = max_bytes
        self.compression = compression
        self.used = 0

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise ValueCodecError(
                Reason.TOO_LARGE,
                f"encoded value passes the limit of {self.max_bytes} bytes; send a smaller "
                "slice, or aggregate before returning",
            )

    def encode(self, obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueCodecError(Reason.TOO_DEEP, f"value nests deeper than {MAX_DEPTH} levels")
        t = type(obj)
        if obj is None or t is bool:
            self.charge(_SCALAR_COST)
            return obj
        if isinstance(obj, np.generic):
            return self.tagged("npscalar", data=self.npy(np.asarray(obj)))
        if isinstance(obj, int):
            self.charge(_SCALAR_COST)
            value = int(obj)
            if _INT64_MIN <= value <= _UINT64_MAX:
                return value
            return self.tagged("bigint", data=str(value))
        if isinstance(obj, float):
            self.charge(_SCALAR_COST)
            return float(obj)
        if isinstance(obj, str):
            self.charge(len(obj) + _SCALAR_COST)
            return str(obj)
        if isinstance(obj, bytes):
            self.charge(len(obj) + _SCALAR_COST)
            return bytes(obj)
        if t is list:
            self.charge(_SCALAR_COST)
            return [self.encode(v, depth + 1) for v in obj]
        if t is dict:
            return self.encode_dict(obj, depth)
        if t is tuple:
            return self.tagged("tuple", items=[self.encode(v, depth + 1) for v in obj])
        if t is set or t is frozenset:
            kind = "set" if t is set else "frozenset"
            return self.tagged("set", type=kind, items=[self.encode(v, depth + 1) for v in obj])
        if isinstance(obj, pd.DataFrame):
            return self.tagged("df", data=self.arrow(obj))
        if isinstance(obj, pd.Series):
            frame = obj.to_frame(name="series")
            return self.tagged("series", data=self.arrow(frame), name=self.encode(obj.name, 0))
        if isinstance(obj, pd.Index):
            return self.tagged("index", data=self.arrow(pd.DataFrame(index=obj)))
        if isinstance(obj, np.ndarray):
            return self.tagged("ndarray", data=self.npy(obj))
        if isinstance(obj, (pd.Timestamp, pd.Timedelta)):
            return self.tagged("pdscalar", data=self.arrow(pd.DataFrame({"v": [obj]})))
        if t in (dt.datetime, dt.date, dt.time, dt.timedelta):
            return self.tagged("datetime", **_encode_datetime(obj))
        if self.allow_pickle:
            return self.tagged("pickle", data=self.pickled(obj))
        raise ValueCodecError(
            Reason.UNSUPPORTED_TYPE,
            f"cannot send a value of type {t.__module__}.{t.__qualname__} to another peer "
            "without pickle; convert it to a DataFrame, numpy array, or plain "
            "list/dict/str/number, or enable allow_pickle between peers that trust each other",
        )

    def tagged(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.charge(_SCALAR_COST * (1 + len(fields)))
        return {TAG: kind, **fields}

    def encode_dict(self, obj: dict[Any, Any], depth: int) -> dict[str, Any]:
        if all(type(k) is str for k in obj):
            self.charge(_SCALAR_COST)
            body = {}
            for k, v in obj.items():
                self.charge(len(k) + _SCALAR_COST)
                body[k] = self.encode(v, depth + 1)
            if TAG in body:
                return self.tagged("dict", items=body)
            return body
        pairs = [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in obj.items()]
        return self.tagged("map", items=pairs)

    def npy(self, arr: np.ndarray) -> memoryview:
        if arr.dtype.hasobject:
            raise ValueCodecError(
                Reason.UNSUPPORTED_TYPE,
                "numpy arrays of dtype object hold arbitrary Python objects and need pickle; "
                "convert to a typed array (e.g. arr.astype(str) or float) or send a list",
            )
        self.charge(arr.nbytes + 128)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getbuffer().toreadonly()

    def arrow(self, frame: pd.DataFrame) -> memoryview:
        if not frame.columns.is_unique:
            dupes = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
            raise ValueCodecError(
                Reason.UNSUPPORTED_TYPE,
                f"DataFrame has duplicate column names {dupes[:5]}; rename them first",
            )
        try:
            table = pa.Table.from_pandas(frame, preserve_index=None)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ValueCodecError(
                Reason.UNSUPPORTED_TYPE,
                f"pandas data that Arrow cannot store ({str(exc)[:200]}); make object "
                "columns one type (e.g. df[col].astype(str)) or enable allow_pickle between "
                "peers that trust each other",
            ) from exc
        extra: dict[str, Any] = {}
        freq = getattr(frame.index, "freq", None)
        if freq is not None:
            extra["index_freq"] = freq.freqstr
        if extra:
            metadata = dict(table.schema.metadata or {})
            metadata[_META_KEY] = json.dumps(extra).encode()
            table = table.replace_schema_metadata(metadata)
        self.charge(table.nbytes + 1024)
        options = pa_ipc.IpcWriteOptions()
        if self.compression is not None:
            options = write_options(choose_codec(table, self.compression))
        if options.compression is None:
            # Written into a buffer of the stream's exact size: a growing one doubles and
            # copies on the way, which held up to 1.5x the frame for a moment.
            out = self.allocate(ipc_size(table, options))
            sink: Any = pa.FixedSizeBufferWriter(pa.py_buffer(out))
        else:
            sink = pa.BufferOutputStream()  # the compressed size is not known beforehand
        with pa_ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        if options.compression is not None:
            out = sink.getvalue()
        # A view keeps Arrow's buffer alive: copying it into bytes held a second 50 MB.
        return memoryview(out).toreadonly()

    def allocate(self, size: int) -> Any:
        """A writable buffer of ``size`` bytes for one Arrow stream."""
        if size < MMAP_MIN_BYTES:
            return pa.allocate_buffer(size)
        if self.allocator is not None:
            return self.allocator(size)
        # A mapping of its own is returned to the system the moment the stream is let go;
        # Arrow's pool (mimalloc) kept a sent frame's pages, 1x the frame for nothing
        # while its result arrived.
        return mmap.mmap(-1, max(size, 1))

    def pickled(self, obj: Any) -> bytes:
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ValueCodecError(
                Reason.UNSUPPORTED_TYPE,
                f"value of type {type(obj).__qualname__} cannot be pickled either: {exc}"[:300],
            ) from exc
        self.charge(len(data))
        return data


class _Decoder:
    def __init__(self, *, allow_pickle: bool, budget: DecodeBudget, exclusive: bool) -> None:
        self.allow_pickle = allow_pickle
        self.budget = budget
        self.exclusive = exclusive

    def decode(self, x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueCodecError(Reason.TOO_DEEP, f"value nests deeper than {MAX_DEPTH} levels")
        if x is None or isinstance(x, (bool, int, float, str, bytes)):
            return x
        if isinstance(x, list):
            return [self.decode(v, depth + 1) for v in x]
        if not isinstance(x, dict):
            raise ValueCodecError(
                Reason.MALFORMED, f"unexpected {type(x).__name__} in an encoded value"
            )
        if TAG not in x:
            return self.decode_plain_dict(x, depth)
        return self.decode_tagged(x, depth)

    def decode_plain_dict(self, x: dict[Any, Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueCodecError(Reason.MALFORMED, f"dict key of type {type(k).__name__}")
            out[k] = self.decode(v, depth + 1)
        return out

    def decode_tagged(self, x: dict[str, Any], depth: int) -> Any:
        kind = x[TAG]
        if kind == "dict":
            return self.decode_plain_dict(_field(x, "items", dict), depth)
        if kind == "tuple":
            return tuple(self.decode(v, depth + 1) for v in _field(x, "items", list))
        if kind == "set":
            items = [self.decode(v, depth + 1) for v in _field(x, "items", list)]
            set_type = _field(x, "type", str)
            if set_type not in ("set", "frozenset"):
                raise ValueCodecError(Reason.MALFORMED, f"unknown set type {set_type!r:.40}")
            return set(items) if set_type == "set" else frozenset(items)
        if kind == "map":
            out: dict[Any, Any] = {}
            for pair in _field(x, "items", list):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueCodecError(Reason.MALFORMED, "map items must be [key, value] pairs")
                out[self.decode(pair[0], depth + 1)] = self.decode(pair[1], depth + 1)
            return out
        if kind == "bigint":
            return int(_field(x, "data", str)[:10_000])
        if kind == "ndarray":
            return load_npy(_field(x, "data", _BINARY), self.budget.charge)
        if kind == "npscalar":
            arr = load_npy(_field(x, "data", _BINARY), self.budget.charge)
            if arr.ndim != 0:
                raise ValueCodecError(Reason.MALFORMED, "npscalar must hold a 0-d array")
            return arr[()]
        if kind == "df":
            return self.arrow(_field(x, "data", _BINARY))
        if kind == "series":
            frame = self.arrow(_field(x, "data", _BINARY))
            if frame.shape[1] != 1:
                raise ValueCodecError(Reason.MALFORMED, "series must hold exactly one column")
            series = frame.iloc[:, 0]
            series.name = self.decode(x.get("name"), depth + 1)
            return series
        if kind == "pdscalar":
            frame = self.arrow(_field(x, "data", _BINARY))
            if frame.shape != (1, 1):
                raise ValueCodecError(Reason.MALFORMED, "pdscalar must hold one value")
            return frame.iloc[0, 0]
        if kind == "index":
            return self.arrow(_field(x, "data", _BINARY)).index
        if kind == "datetime":
            return _decode_datetime(x)
        if kind == "pickle":
            if not self.allow_pickle:
                raise ValueCodecError(
                    Reason.PICKLE_REFUSED,
                    "value was pickled by the sender; pickle is refused unless both peers "
                    "explicitly trust each other (allow_pickle=True)",
                )
            return pickle.loads(_field(x, "data", bytes))
        raise ValueCodecError(Reason.MALFORMED, f"unknown tag {kind!r:.40}")

    def arrow(self, data: bytes | memoryview) -> pd.DataFrame:
        # Headers first: nothing is decompressed until the whole stream fits the budget.
        self.budget.charge(arrow_stream_cost(data))
        reader = pa_ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
        table = pa.Table.from_batches(batches, schema=reader.schema)
        # The IPC reader checks framing, not contents: offsets and lengths a peer forged
        # would let the native pandas conversion read out of bounds (it aborted the whole
        # process under fuzzing). A full validation turns that into ArrowInvalid first.
        table.validate(full=True)
        schema = table.schema
        if (
            self.exclusive
            and isinstance(data, memoryview)
            and not data.readonly
            and table.num_columns <= MAX_SPLIT_COLUMNS
        ):
            # One block per column: Arrow hands numeric columns over as views of
            # ``data`` (consolidating them into 2-D blocks copied every column).
            frame = _own_columns(table.to_pandas(split_blocks=True), data)
        else:
            frame = table.to_pandas()
        del table, batches, reader
        _restore_object_columns(frame, schema.pandas_metadata or {})
        raw_extra = (schema.metadata or {}).get(_META_KEY)
        if raw_extra:
            extra = json.loads(raw_extra)
            if isinstance(extra, dict) and isinstance(extra.get("index_freq"), str):
                frame.index = type(frame.index)(frame.index, freq=extra["index_freq"])
        return frame


def _own_columns(frame: pd.DataFrame, data: memoryview) -> pd.DataFrame:
    """``frame`` with each column that is a read-only view of ``data`` (Arrow's zero-copy
    conversion) made writable: a writable view of the same bytes where it is a plain
    numeric array, a copy otherwise.

    Arrow marks every zero-copy array read-only, and pandas writes in place into an
    unreferenced block (``df.iloc[0, 0] = 1`` raised "assignment destination is
    read-only"). The caller owns ``data``, so its bytes may be the frame's own. Only a
    column pandas itself shows as a plain 1-D numpy array lying inside ``data`` is viewed
    again, with the same dtype, length and address: what it reads cannot change.
    Arrow-backed columns (strings) are immutable in pandas and stay as they are.
    """
    base = np.frombuffer(data, dtype=np.uint8)
    start = base.ctypes.data
    end = start + base.nbytes
    arrays: list[Any] = []
    changed = False
    for pos in range(frame.shape[1]):
        values = frame.iloc[:, pos]._values
        if (
            isinstance(values, np.ndarray)
            and values.ndim == 1
            and values.dtype.kind in "iuf"
            and not values.flags.writeable
            and values.flags.c_contiguous
            and start <= values.ctypes.data
            and values.ctypes.data + values.nbytes <= end
        ):
            offset = values.ctypes.data - start
            values = np.frombuffer(data, dtype=values.dtype, count=len(values), offset=offset)
            changed = True
        elif any(not a.flags.writeable for a in _backing_arrays(values)):
            values = values.copy()  # datetimes, categorical codes: viewed read-only
            changed = True
        arrays.append(values)
    if not changed:
        return frame
    out = pd.DataFrame(dict(enumerate(arrays)), index=frame.index, copy=False)
    out.columns = frame.columns
    return out


def _backing_arrays(values: Any) -> list[np.ndarray]:
    """The numpy arrays a pandas column writes into (none for Arrow-backed ones)."""
    if isinstance(values, np.ndarray):
        return [values]
    found = [getattr(values, name, None) for name in ("_ndarray", "_data", "_mask")]
    return [a for a in found if isinstance(a, np.ndarray)]


# Binary payloads arrive as bytes off the wire, as memoryviews when decoded where encoded.
_BINARY = (bytes, memoryview)


def _field(x: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = x.get(name)
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ValueCodecError(
            Reason.MALFORMED, f"tag {x.get(TAG)!r:.40} needs {name!r} of type {names}"
        )
    return value


def _to_object(values: Any) -> Any:
    """Arrow has one null; an object column's nulls come back as None, like pandas < 3."""
    obj = pd.Series(values, dtype=object)
    return obj.where(obj.notna(), None).astype(object)


def _restore_object_columns(frame: pd.DataFrame, meta: dict[str, Any]) -> None:
    """pandas >= 3 turns Arrow strings into ``str`` dtype; put object columns back."""
    if not meta:
        return
    index_fields = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    columns = meta.get("columns", [])
    by_field = {c.get("field_name"): c for c in columns}
    data_columns = [c for c in columns if c.get("field_name") not in index_fields]
    for pos, col in enumerate(data_columns[: frame.shape[1]]):
        if col.get("numpy_type") == "object" and not is_object_dtype(frame.dtypes.iloc[pos]):
            frame.isetitem(pos, _to_object(frame.iloc[:, pos]))
    levels = []
    changed = False
    for i, name in enumerate(index_fields):
        level = frame.index.get_level_values(i)
        if by_field.get(name, {}).get("numpy_type") == "object" and not is_object_dtype(
            level.dtype
        ):
            level = pd.Index(_to_object(level).to_numpy(dtype=object), dtype=object)
            changed = True
        levels.append(level)
    if changed:
        names = list(frame.index.names)
        if len(levels) == 1:
            frame.index = pd.Index(levels[0], name=names[0], dtype=object)
        else:
            frame.index = pd.MultiIndex.from_arrays(levels, names=names)


def _encode_datetime(obj: dt.datetime | dt.date | dt.time | dt.timedelta) -> dict[str, Any]:
    if isinstance(obj, dt.timedelta):
        return {"type": "timedelta", "data": obj // dt.timedelta(microseconds=1)}
    if (isinstance(obj, (dt.datetime, dt.time))) and obj.tzinfo is not None:
        if obj.utcoffset() is None or not isinstance(obj.tzinfo, dt.timezone):
            raise ValueCodecError(
                Reason.UNSUPPORTED_TYPE,
                "datetime with a named time zone; convert it to pandas.Timestamp inside a "
                "Series/DataFrame (keeps the zone) or to UTC",
            )
    return {"type": type(obj).__name__, "data": obj.isoformat()}


def _decode_datetime(x: dict[str, Any]) -> Any:
    kind = _field(x, "type", str)
    if kind == "timedelta":
        return dt.timedelta(microseconds=_field(x, "data", int))
    text = _field(x, "data", str)[:64]
    parsers = {
        "datetime": dt.datetime.fromisoformat,
        "date": dt.date.fromisoformat,
        "time": dt.time.fromisoformat,
    }
    if kind not in parsers:
        raise ValueCodecError(Reason.MALFORMED, f"unknown datetime type {kind!r:.40}")
    return parsers[kind](text)
