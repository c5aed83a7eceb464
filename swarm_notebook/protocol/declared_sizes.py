"""What an Arrow IPC stream or a ``.npy`` blob will cost to decode, read from its headers.

A peer chooses these bytes, and both formats let a few kilobytes declare gigabytes: an
Arrow body compressed with zstd or lz4 states each buffer's uncompressed length in an
8-byte prefix, and a ``.npy`` header states a shape. The decoders allocate what is declared,
so the cost is computed here from the headers alone, before anything is decompressed or
allocated, and the caller refuses it against its budget.

Arrow message metadata is a flatbuffer (``Message.fbs``); pyarrow offers no Python view of
a record batch's buffer list, so :class:`_Table` reads the few fields needed by hand. Every
offset is bounds-checked by ``struct`` (it raises instead of reading past the end) and vector
lengths are checked against the buffer before anything is built from them.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as pa_ipc

from swarm_notebook.errors import ValueCodecError
from swarm_notebook.reasons import Reason

# Decoding holds the Arrow buffers and the pandas copy made from them at once.
BUFFER_COPIES = 2
# What one decoded element costs beyond its Arrow buffers when pandas turns it into a
# Python object (str, bytes, list, dict, None): object header + pointer, rounded up.
OBJECT_ELEMENT_COST = 64
BATCH_OVERHEAD = 1024
_HEADER_RECORD_BATCH = 3
_HEADER_DICTIONARY_BATCH = 2
_HEADER_SCHEMA = 1
_UNCOMPRESSED = -1  # prefix of a buffer the writer left uncompressed (not worth it)


class _Table:
    """A flatbuffer table: fields looked up through its vtable (little-endian)."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_len = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index: int) -> int:
        slot = 4 + 2 * index
        if slot + 2 > self.vtable_len:
            return 0
        offset = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + offset if offset else 0

    def scalar(self, index: int, fmt: str, default: int) -> int:
        at = self._field(index)
        return int(struct.unpack_from(fmt, self.buf, at)[0]) if at else default

    def table(self, index: int) -> _Table | None:
        at = self._field(index)
        if not at:
            return None
        return _Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0])

    def structs(self, index: int, fmt: str) -> list[tuple[int, ...]]:
        at = self._field(index)
        if not at:
            return []
        vector = at + struct.unpack_from("<I", self.buf, at)[0]
        count = struct.unpack_from("<I", self.buf, vector)[0]
        size = struct.calcsize(fmt)
        start = vector + 4
        if count * size > len(self.buf) - start:
            raise ValueCodecError(Reason.MALFORMED, "Arrow metadata vector runs past its buffer")
        return [struct.unpack_from(fmt, self.buf, start + i * size) for i in range(count)]


@dataclass
class _Batch:
    rows: int
    nodes: list[tuple[int, ...]]
    buffers: list[tuple[int, ...]]
    compressed: bool


def _batch_of(metadata: pa.Buffer) -> tuple[int, _Batch | None]:
    buf = memoryview(metadata)
    message = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
    header_type = message.scalar(1, "<B", 0)
    header = message.table(2)
    if header_type == _HEADER_DICTIONARY_BATCH and header is not None:
        header = header.table(1)
    elif header_type != _HEADER_RECORD_BATCH:
        return header_type, None
    if header is None:
        raise ValueCodecError(Reason.MALFORMED, "Arrow batch message without a header")
    return header_type, _Batch(
        rows=header.scalar(0, "<q", 0),
        nodes=header.structs(1, "<qq"),
        buffers=header.structs(2, "<qq"),
        compressed=header.table(3) is not None,
    )


def _buffer_bytes(batch: _Batch, body: pa.Buffer | None) -> int:
    """Bytes the batch's buffers take once read: declared uncompressed sizes if compressed."""
    body_len = body.size if body is not None else 0
    view = memoryview(body) if body is not None else memoryview(b"")
    total = 0
    for offset, length in batch.buffers:
        if offset < 0 or length < 0 or offset + length > body_len:
            raise ValueCodecError(Reason.MALFORMED, "Arrow buffer lies outside its message body")
        if not batch.compressed or length == 0:
            total += length
            continue
        if length < 8:
            raise ValueCodecError(Reason.MALFORMED, "compressed Arrow buffer without its length")
        declared = struct.unpack_from("<q", view, offset)[0]
        if declared == _UNCOMPRESSED:
            total += length - 8
        elif declared < 0:
            raise ValueCodecError(Reason.MALFORMED, f"Arrow buffer declares {declared} bytes")
        else:
            total += declared
    return total


def _node_costs(schema: pa.Schema) -> list[int]:
    """Per-element extra cost of each field node, in the order Arrow lays nodes out."""
    costs: list[int] = []

    def visit(type_: pa.DataType) -> None:
        fixed = (
            pa.types.is_integer(type_)
            or pa.types.is_floating(type_)
            or pa.types.is_boolean(type_)
            or pa.types.is_temporal(type_)
            or pa.types.is_decimal(type_)
            or pa.types.is_dictionary(type_)
        )
        costs.append(0 if fixed else OBJECT_ELEMENT_COST)
        for i in range(type_.num_fields):
            visit(type_.field(i).type)

    for field in schema:
        visit(field.type)
    return costs


def _messages(data: bytes | memoryview) -> Iterator[pa.ipc.Message]:
    reader = pa_ipc.MessageReader.open_stream(pa.py_buffer(data))
    while True:
        try:
            yield reader.read_next_message()
        except StopIteration:
            return


def arrow_stream_cost(data: bytes | memoryview) -> int:
    """Bytes decoding this Arrow IPC stream into pandas will hold, from headers only.

    Raises ``ValueCodecError`` (``malformed``) for anything that is not a sound stream.
    """
    try:
        return _arrow_stream_cost(data)
    except ValueCodecError:
        raise
    except (pa.ArrowException, OSError, struct.error, ValueError, IndexError) as exc:
        raise ValueCodecError(Reason.MALFORMED, f"bad Arrow stream: {exc}"[:300]) from exc


def _arrow_stream_cost(data: bytes | memoryview) -> int:
    schema: pa.Schema | None = None
    node_costs: list[int] = []
    total = 0
    for message in _messages(data):
        header_type, batch = _batch_of(message.metadata)
        if header_type == _HEADER_SCHEMA:
            if schema is not None:
                raise ValueCodecError(Reason.MALFORMED, "Arrow stream with two schemas")
            schema = pa_ipc.read_schema(message)
            node_costs = _node_costs(schema)
            continue
        if batch is None:
            raise ValueCodecError(Reason.MALFORMED, f"Arrow message of header type {header_type}")
        if batch.rows < 0 or any(n < 0 for node in batch.nodes for n in node):
            raise ValueCodecError(Reason.MALFORMED, "Arrow batch with a negative length")
        total += BATCH_OVERHEAD + BUFFER_COPIES * _buffer_bytes(batch, message.body)
        if header_type == _HEADER_RECORD_BATCH:
            if len(batch.nodes) != len(node_costs):
                raise ValueCodecError(Reason.MALFORMED, "Arrow batch does not match its schema")
            total += sum(node[0] * cost for node, cost in zip(batch.nodes, node_costs, strict=True))
        else:  # dictionary values: their type is not tracked here, so assume objects
            total += sum(node[0] * OBJECT_ELEMENT_COST for node in batch.nodes)
    if schema is None:
        raise ValueCodecError(Reason.MALFORMED, "Arrow stream without a schema")
    return total


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    readers: dict[tuple[int, int], Callable[[io.BytesIO], tuple[tuple[int, ...], bool, np.dtype]]]
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    reader = readers.get(version)
    if reader is None:
        raise ValueCodecError(Reason.MALFORMED, f"npy format version {version} is not accepted")
    return reader(stream)


# numpy itself refuses headers over 10 000 bytes; the magic and length prefix come first.
_NPY_HEAD_MAX = 16 * 1024


def load_npy(data: bytes | memoryview, charge: Callable[[int], None]) -> np.ndarray:
    """Read ``.npy`` bytes with ``allow_pickle=False``; ``charge`` sees the size first."""
    # Only the header is parsed from a stream: BytesIO over a memoryview copies it whole.
    stream = io.BytesIO(bytes(memoryview(data)[:_NPY_HEAD_MAX]))
    try:
        shape, fortran_order, dtype = _npy_header(stream)
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
        raise ValueCodecError(Reason.MALFORMED, f"bad npy header: {exc}"[:300]) from exc
    if dtype.hasobject:
        raise ValueCodecError(
            Reason.MALFORMED, "npy data of dtype object is refused (needs pickle)"
        )
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueCodecError(Reason.MALFORMED, f"npy shape {shape!r:.80} is not valid")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    charge(max(nbytes, count))  # zero-size items still cost a slot each in numpy's loops
    offset = stream.tell()
    if len(data) - offset != nbytes:
        raise ValueCodecError(
            Reason.MALFORMED, f"npy header declares {nbytes} bytes, {len(data) - offset} present"
        )
    if dtype.itemsize == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran_order else "C")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C").copy(order="K")
