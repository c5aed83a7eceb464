"""Large binaries travel beside a msgpack message instead of inside it (out-of-band).

msgpack copies every binary into the one encoded message, and decoding copies it out
again into a ``bytes``: a 50 MB Arrow stream existed three times on each hop. Here a
message whose body holds a ``memoryview`` of at least ``MIN_OOB_BYTES`` (what the value
codec returns for Arrow and npy data) is laid out as::

    MARK(0xC1) | head length (u32) | msgpack head | raw area (the binaries, back to back)

Each such binary is replaced in the head by ``Ext(EXT_CODE, offset (u64) | length (u64))``
into the raw area. :func:`encode` returns the parts (the head and views of the caller's own
buffers) for the sender to write or chunk one after another; :func:`decode` gives views of
the received buffer back, so nothing is copied on either side. ``0xC1`` is the one byte
msgpack never uses, so a plain msgpack message is told apart by its first byte.

Only ``memoryview`` goes out of band: ``bytes`` (a user's own value, a pickle, a ref's
payload) stay inline and arrive as ``bytes``, so receivers that check for ``bytes`` keep
working. Views a peer declares are checked against the raw area it actually sent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgspec

from swarm_notebook.errors import ProtocolError
from swarm_notebook.reasons import Reason

MARK = 0xC1
EXT_CODE = 81
MIN_OOB_BYTES = 64 * 1024
_HEAD = struct.Struct(">BI")
_REF = struct.Struct(">QQ")

Buffer = bytes | bytearray | memoryview


def split(obj: Any) -> tuple[Any, list[memoryview]]:
    """``obj`` with its large memoryviews replaced by placeholders, and those views.

    Containers are rebuilt only where something was replaced, so a message without
    large binaries is returned as it is (one walk, no copy).
    """
    blobs: list[memoryview] = []
    return _walk(obj, blobs), blobs


def _walk(x: Any, blobs: list[memoryview]) -> Any:
    # A function, not a closure: a recursive closure is a reference cycle, and it kept
    # ``blobs`` (a frame's buffer) alive until the garbage collector happened to run.
    t = type(x)
    if t is dict:
        out: dict[Any, Any] | None = None
        for k, v in x.items():
            w = _walk(v, blobs)
            if w is not v:
                if out is None:
                    out = dict(x)
                out[k] = w
        return x if out is None else out
    if t is list or t is tuple:
        items: list[Any] | None = None
        for i, v in enumerate(x):
            w = _walk(v, blobs)
            if w is not v:
                if items is None:
                    items = list(x)
                items[i] = w
        return x if items is None else items
    if t is memoryview and x.nbytes >= MIN_OOB_BYTES:
        view = x if x.format == "B" and x.ndim == 1 else x.cast("B")
        offset = sum(b.nbytes for b in blobs)
        blobs.append(view)
        return msgspec.msgpack.Ext(EXT_CODE, _REF.pack(offset, view.nbytes))
    return x


def join(head: bytes, blobs: list[memoryview]) -> list[Buffer]:
    """The parts of one message: the marked head, then the blobs (not copied)."""
    if not blobs:
        return [head]
    return [_HEAD.pack(MARK, len(head)) + head, *blobs]


def encode(obj: Any, encoder: msgspec.msgpack.Encoder) -> list[Buffer]:
    """Encode ``obj`` as parts to send back to back (one part when nothing is large)."""
    body, blobs = split(obj)
    return join(encoder.encode(body), blobs)


def size(parts: list[Buffer]) -> int:
    """Bytes in all parts together."""
    return sum(memoryview(p).nbytes for p in parts)


def parse(data: Buffer) -> tuple[Buffer, memoryview | None]:
    """The msgpack head and the raw area (``None``: a plain message) of one message."""
    if not data or data[0] != MARK:
        return data, None
    view = memoryview(data).toreadonly()
    if len(view) < _HEAD.size:
        raise ProtocolError(Reason.MALFORMED, "out-of-band header cut short")
    _, head_len = _HEAD.unpack_from(view)
    end = _HEAD.size + head_len
    if end > len(view):
        raise ProtocolError(Reason.MALFORMED, f"out-of-band head of {head_len} bytes cut short")
    return view[_HEAD.size : end], view[end:]


def resolver(raw: memoryview | None) -> Callable[[int, memoryview], Any]:
    """An msgspec ``ext_hook`` that turns placeholders into views of ``raw``."""

    def hook(code: int, data: memoryview) -> Any:
        if code != EXT_CODE:
            return msgspec.msgpack.Ext(code, bytes(data))
        if raw is None or len(data) != _REF.size:
            raise ProtocolError(Reason.MALFORMED, "out-of-band reference outside such a message")
        offset, length = _REF.unpack(data)
        if offset + length > len(raw):
            raise ProtocolError(
                Reason.MALFORMED,
                f"out-of-band reference to {offset}+{length} past {len(raw)} bytes sent",
            )
        return raw[offset : offset + length]

    return hook


def decode(data: Buffer, plain: msgspec.msgpack.Decoder[Any], type_: Any = Any) -> Any:
    """Decode one message: with ``plain`` (made with ``ext_hook=resolver(None)``) when it
    has no raw area, else with a decoder whose hook points into ``data``.

    Raises ``ProtocolError`` (malformed) for a bad layout or reference, and whatever
    msgspec raises for bad msgpack.
    """
    head, raw = parse(data)
    if raw is None:
        return plain.decode(head)
    # A decoder per such message (a few microseconds against the megabytes it carries).
    return msgspec.msgpack.Decoder(type_, ext_hook=resolver(raw)).decode(head)


def plain_decoder(type_: Any = Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder for messages without a raw area (it refuses out-of-band references)."""
    return msgspec.msgpack.Decoder(type_, ext_hook=resolver(None))
