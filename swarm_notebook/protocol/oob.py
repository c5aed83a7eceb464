"""Large binaries travel beside a msgpack message instead of inside it (out-of-band).

msgpack copies every binary into the one encoded message, and decoding copies it out
again into a ``bytes``: a 50 MB Arrow stream existed three times on each hop. Here a
message whose body holds a ``memoryview`` of at least ``MIN_OOB_BYTES`` (what the value
codec returns for Arrow and npy data) is laid out as::

    MARK(0xC1) | head length (u32) | msgpack head | raw area (the binaries, back to back)

Each such binary is replaced in the head by ``Ext(EXT_CODE, offset (u64) | length (u64))``
into the raw area. The sender starts each binary at a multiple of ``ALIGN`` bytes from the
message's start (zero padding before it, skipped by the offsets), so numeric columns
decoded in place from a received buffer are aligned numpy arrays. :func:`encode` returns
the parts (the head and views of the caller's own buffers) for the sender to write or
chunk one after another; :func:`decode` gives views of the received buffer back, so
nothing is copied on either side. ``0xC1`` is the one byte
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
ALIGN = 64
_HEAD = struct.Struct(">BI")
_REF = struct.Struct(">QQ")

Buffer = bytes | bytearray | memoryview


def split(obj: Any, lead: int = 0) -> tuple[Any, list[memoryview]]:
    """``obj`` with its large memoryviews replaced by placeholders, and those views.

    Containers are rebuilt only where something was replaced, so a message without
    large binaries is returned as it is (one walk, no copy). The placeholders' offsets
    count ``lead`` bytes of padding first and pad each binary to ``ALIGN`` (``join``
    writes the same padding).
    """
    blobs: list[memoryview] = []
    return _walk(obj, blobs, lead), blobs


def _padded(lead: int, blobs: list[memoryview]) -> int:
    """Where the next binary starts in the raw area, after ``blobs``."""
    end = lead
    for b in blobs:
        end += b.nbytes
    return end + (-end % ALIGN) if blobs else lead


def _walk(x: Any, blobs: list[memoryview], lead: int) -> Any:
    # A function, not a closure: a recursive closure is a reference cycle, and it kept
    # ``blobs`` (a frame's buffer) alive until the garbage collector happened to run.
    t = type(x)
    if t is dict:
        out: dict[Any, Any] | None = None
        for k, v in x.items():
            w = _walk(v, blobs, lead)
            if w is not v:
                if out is None:
                    out = dict(x)
                out[k] = w
        return x if out is None else out
    if t is list or t is tuple:
        items: list[Any] | None = None
        for i, v in enumerate(x):
            w = _walk(v, blobs, lead)
            if w is not v:
                if items is None:
                    items = list(x)
                items[i] = w
        return x if items is None else items
    if t is memoryview and x.nbytes >= MIN_OOB_BYTES:
        view = x if x.format == "B" and x.ndim == 1 else x.cast("B")
        offset = _padded(lead, blobs)
        blobs.append(view)
        return msgspec.msgpack.Ext(EXT_CODE, _REF.pack(offset, view.nbytes))
    return x


def join(head: bytes, blobs: list[memoryview], lead: int = 0) -> list[Buffer]:
    """The parts of one message: the marked head, then the blobs (not copied), with the
    padding ``split(obj, lead)`` counted."""
    if not blobs:
        return [head]
    parts: list[Buffer] = [_HEAD.pack(MARK, len(head)) + head]
    at = 0
    for i, blob in enumerate(blobs):
        start = _padded(lead, blobs[:i])
        if start > at:
            parts.append(bytes(start - at))
        parts.append(blob)
        at = start + blob.nbytes
    return parts


def layout(obj: Any, encode_head: Callable[[Any], bytes]) -> list[Buffer]:
    """``obj`` as parts to send back to back, its binaries aligned (see the module doc).

    ``encode_head`` encodes ``obj`` with placeholders in; a placeholder's size does not
    depend on its offset, so the head is encoded once more at most, once the padding
    after it is known.
    """
    body, blobs = split(obj)
    if not blobs:
        return [encode_head(obj)]
    head = encode_head(body)
    lead = -(_HEAD.size + len(head)) % ALIGN
    if lead:
        body, blobs = split(obj, lead)
        head = encode_head(body)
    return join(head, blobs, lead)


def encode(obj: Any, encoder: msgspec.msgpack.Encoder) -> list[Buffer]:
    """Encode ``obj`` as parts to send back to back (one part when nothing is large)."""
    return layout(obj, encoder.encode)


def size(parts: list[Buffer]) -> int:
    """Bytes in all parts together."""
    return sum(memoryview(p).nbytes for p in parts)


def parse(data: Buffer, *, owned: bool = False) -> tuple[Buffer, memoryview | None]:
    """The msgpack head and the raw area (``None``: a plain message) of one message.

    The raw area is read-only unless ``owned``: the caller hands ``data`` over (nothing
    else reads it afterwards), so values decoded from it may use its memory as their own
    (see ``values.decode_value(..., exclusive=True)``).
    """
    if not data or data[0] != MARK:
        return data, None
    view = memoryview(data)
    if not owned:
        view = view.toreadonly()
    if len(view) < _HEAD.size:
        raise ProtocolError(Reason.MALFORMED, "out-of-band header cut short")
    _, head_len = _HEAD.unpack_from(view)
    end = _HEAD.size + head_len
    if end > len(view):
        raise ProtocolError(Reason.MALFORMED, f"out-of-band head of {head_len} bytes cut short")
    return view[_HEAD.size : end], view[end:]


ExtHook = Callable[[int, memoryview], Any]


def resolver(raw: memoryview | None, ext: ExtHook | None = None) -> ExtHook:
    """An msgspec ``ext_hook`` that turns placeholders into views of ``raw``.

    A writable ``raw`` gives writable views, each range once: a reference that overlaps
    one already given comes back read-only, so two values a peer made share memory can
    never alias each other's writes (they are copied when decoded instead).
    """
    claimed: list[tuple[int, int]] = []

    def hook(code: int, data: memoryview) -> Any:
        if code != EXT_CODE:
            if ext is not None:
                return ext(code, data)
            return msgspec.msgpack.Ext(code, bytes(data))
        if raw is None or len(data) != _REF.size:
            raise ProtocolError(Reason.MALFORMED, "out-of-band reference outside such a message")
        offset, length = _REF.unpack(data)
        if offset + length > len(raw):
            raise ProtocolError(
                Reason.MALFORMED,
                f"out-of-band reference to {offset}+{length} past {len(raw)} bytes sent",
            )
        view = raw[offset : offset + length]
        if raw.readonly:
            return view
        end = offset + length
        if any(offset < e and s < end for s, e in claimed):
            return view.toreadonly()
        claimed.append((offset, end))
        return view

    return hook


def decode(
    data: Buffer,
    plain: msgspec.msgpack.Decoder[Any],
    type_: Any = Any,
    *,
    owned: bool = False,
    ext: ExtHook | None = None,
) -> Any:
    """Decode one message: with ``plain`` (made with ``ext_hook=resolver(None)``) when it
    has no raw area, else with a decoder whose hook points into ``data`` (writable views
    when ``owned``, see ``parse``). ``ext`` decodes the other extension types.

    Raises ``ProtocolError`` (malformed) for a bad layout or reference, and whatever
    msgspec raises for bad msgpack.
    """
    head, raw = parse(data, owned=owned)
    if raw is None and ext is None:
        return plain.decode(head)
    # A decoder per such message (a few microseconds against the megabytes it carries).
    return msgspec.msgpack.Decoder(type_, ext_hook=resolver(raw, ext)).decode(head)


def plain_decoder(type_: Any = Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder for messages without a raw area (it refuses out-of-band references)."""
    return msgspec.msgpack.Decoder(type_, ext_hook=resolver(None))
