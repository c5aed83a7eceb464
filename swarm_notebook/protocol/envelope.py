"""The versioned envelope every application message travels in over a peer link.

Encoded with msgpack (msgspec) so binary payloads (Arrow IPC, npy) ride as raw bytes and
are never re-encoded as JSON text.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol import oob
from swarm_notebook.reasons import Reason

PROTOCOL_VERSION = 1
MAX_TYPE_LENGTH = 64
MAX_ID_LENGTH = 64

T = TypeVar("T")


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One application message.

    ``type`` selects the handler; ``id`` is unique per sender; ``reply_to`` carries the
    correlation id of the request this answers; ``body`` is any msgpack value (bytes stay
    bytes).
    """

    v: int
    type: str
    id: str
    reply_to: str | None = None
    body: Any = None
    ask: bool = False  # the sender awaits a reply correlated by ``id``


_encoder = msgspec.msgpack.Encoder()
_plain_decoder = oob.plain_decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """One buffer (large binaries inline): for in-process links and small messages."""
    return _encoder.encode(envelope)


def encode_envelope_parts(envelope: Envelope) -> list[oob.Buffer]:
    """The envelope as parts to chunk back to back: large memoryviews in the body are not
    copied into the message (see ``oob``); one part when there are none."""
    return oob.layout(
        envelope.body,
        lambda body: _encoder.encode(
            envelope if body is envelope.body else msgspec.structs.replace(envelope, body=body)
        ),
    )


def decode_envelope(data: oob.Buffer, *, max_size: int, owned: bool = False) -> Envelope:
    """Decode and validate one envelope; every failure is a ``ProtocolError``.

    Binaries sent out of band come back as views of ``data`` (not copied): read-only
    unless ``owned`` (the caller hands a buffer of its own over, see ``oob.parse``)."""
    if len(data) > max_size:
        raise ProtocolError(Reason.OVERSIZED, f"{len(data)} bytes > limit {max_size}")
    try:
        env: Envelope = oob.decode(data, _plain_decoder, Envelope, owned=owned)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # msgspec raises the last two itself for invalid UTF-8 in a string and for
        # nesting deeper than the interpreter's limit; both are malformed input.
        raise ProtocolError(Reason.MALFORMED, str(exc)[:200]) from exc
    if env.v != PROTOCOL_VERSION:
        raise ProtocolError(Reason.BAD_VERSION, f"version {env.v}, expected {PROTOCOL_VERSION}")
    if not env.type or len(env.type) > MAX_TYPE_LENGTH:
        raise ProtocolError(Reason.BAD_TYPE, repr(env.type)[:80])
    if not env.id or len(env.id) > MAX_ID_LENGTH:
        raise ProtocolError(Reason.BAD_ID, repr(env.id)[:80])
    if env.reply_to is not None and len(env.reply_to) > MAX_ID_LENGTH:
        raise ProtocolError(Reason.BAD_ID, "reply_to too long")
    return env


class _Head(msgspec.Struct, array_like=True):
    """An envelope's leading fields; the rest of the array is skipped."""

    v: int
    type: str
    id: str


def _skip_ext(code: int, data: memoryview) -> None:
    return None


_head_decoder = msgspec.msgpack.Decoder(_Head, ext_hook=_skip_ext)


def envelope_id(data: oob.Buffer) -> str | None:
    """The id of a message refused before decoding (too large), so the refusal can name
    it and the sender's request fails at once; None when it has no readable id.

    Only for a buffer already held whole (one frame): it is parsed, never kept."""
    try:
        head, _ = oob.parse(data)
        found = _head_decoder.decode(head).id
    except (ProtocolError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return found if 0 < len(found) <= MAX_ID_LENGTH else None


def convert_body(body: Any, schema: type[T]) -> T:
    """Validate a decoded body against a typed schema (a ``msgspec.Struct``)."""
    try:
        return msgspec.convert(body, schema)
    except msgspec.ValidationError as exc:
        raise ProtocolError(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc
