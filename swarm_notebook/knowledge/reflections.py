"""Reflections: short lessons a peer learned, signed by their author.

A reflection is inert text. Nothing in it is ever executed, evaluated or rendered as
markup by this package; the widget must escape it like any other peer-supplied text.

The *content hash* covers what the lesson says (category, description, outcome,
recommendations, tags) and nothing about who said it or when, so the same lesson
shared by two peers de-duplicates to one entry. The *signature* binds that hash to an
author and a timestamp.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from swarm_notebook.errors import ReflectionRejected
from swarm_notebook.identity import Identity, is_canonical_peer_id, verify_signature
from swarm_notebook.reasons import Reason

CONTENT_DOMAIN = "swarm-notebook/reflection-content/v1"
SIGNATURE_CONTEXT = b"swarm-notebook/reflection/v1\x00"
PROVENANCE_TAG_PREFIX = "shared_from_"
SUCCESSFUL = "successful"

_PEER_ID = re.compile(r"[a-z2-7]{52}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")
_OUTCOME = re.compile(r"[a-z][a-z0-9_-]*")
_TAG = re.compile(r"[^\s\x00-\x1f\x7f]+")
# Newlines and tabs are fine in prose; other control characters only hide things.
_BAD_PROSE_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BAD_LINE_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class Reflection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One lesson. ``signature`` is hex, empty when unsigned (a local draft)."""

    category: str
    description: str
    outcome: str
    recommendations: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    author: str = ""
    timestamp: float = 0.0
    signature: str = ""


@dataclass(frozen=True)
class ReflectionLimits:
    """Caps on every field (characters / counts) and on the msgpack-encoded size (bytes)."""

    category: int = 64
    description: int = 4000
    outcome: int = 32
    recommendations: int = 16
    recommendation: int = 1000
    tags: int = 16
    tag: int = 64
    encoded_bytes: int = 16 * 1024


DEFAULT_LIMITS = ReflectionLimits()

_encoder = msgspec.msgpack.Encoder()


def encode_reflection(reflection: Reflection) -> bytes:
    """The msgpack wire form (what ``validate_reflection`` accepts back as bytes)."""
    return _encoder.encode(reflection)


def _content_tags(tags: Iterable[str]) -> list[str]:
    # Tags are a set; provenance tags are added by the receiving store, not the author.
    return sorted({t for t in tags if not t.startswith(PROVENANCE_TAG_PREFIX)})


def content_hash(reflection: Reflection) -> str:
    """Hex sha256 over the canonical msgpack of the content fields.

    Excludes author, timestamp, signature and provenance (``shared_from_*``) tags;
    tag order and repeats do not matter, recommendation order does.
    """
    canonical = _encoder.encode(
        [
            CONTENT_DOMAIN,
            reflection.category,
            reflection.description,
            reflection.outcome,
            list(reflection.recommendations),
            _content_tags(reflection.tags),
        ]
    )
    return hashlib.sha256(canonical).hexdigest()


def signing_payload(reflection: Reflection) -> bytes:
    """Domain-separated bytes the author signs: content hash, author, timestamp."""
    return SIGNATURE_CONTEXT + _encoder.encode(
        [content_hash(reflection), reflection.author, float(reflection.timestamp)]
    )


def sign_reflection(
    identity: Identity,
    *,
    category: str,
    description: str,
    outcome: str,
    recommendations: Iterable[str] = (),
    tags: Iterable[str] = (),
    timestamp: float | None = None,
    limits: ReflectionLimits = DEFAULT_LIMITS,
) -> Reflection:
    """Build, validate and sign a reflection authored by ``identity``.

    >>> from swarm_notebook.identity import Identity
    >>> r = sign_reflection(Identity.generate(), category="pandas",
    ...                     description="use merge(validate='one_to_one')",
    ...                     outcome="successful", timestamp=1.0)
    >>> verify_reflection(r)
    True
    """
    draft = Reflection(
        category=category,
        description=description,
        outcome=outcome,
        recommendations=tuple(recommendations),
        tags=tuple(tags),
        author=identity.peer_id,
        timestamp=float(time.time() if timestamp is None else timestamp),
    )
    validate_reflection(draft, limits=limits)
    signed = msgspec.structs.replace(draft, signature=identity.sign(signing_payload(draft)).hex())
    return signed


def verify_reflection(reflection: Reflection) -> bool:
    """True when the signature was made by the key behind ``reflection.author``."""
    if not reflection.signature or not _PEER_ID.fullmatch(reflection.author):
        return False
    try:
        signature = bytes.fromhex(reflection.signature)
    except ValueError:
        return False
    return verify_signature(reflection.author, signature, signing_payload(reflection))


def _check_line(field: str, value: str, cap: int, *, allow_empty: bool) -> None:
    if len(value) > cap:
        raise ReflectionRejected(Reason.OVERSIZED, f"{field} has {len(value)} characters > {cap}")
    if not value and not allow_empty:
        raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{field} is empty")
    if _BAD_LINE_CHARS.search(value):
        raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{field} contains control characters")


def _check_prose(field: str, value: str, cap: int) -> None:
    if len(value) > cap:
        raise ReflectionRejected(Reason.OVERSIZED, f"{field} has {len(value)} characters > {cap}")
    if _BAD_PROSE_CHARS.search(value):
        raise ReflectionRejected(Reason.WRONG_SCHEMA, f"{field} contains control characters")


def _check_fields(
    reflection: Reflection, limits: ReflectionLimits, allow_provenance_tags: bool
) -> None:
    _check_line("category", reflection.category, limits.category, allow_empty=True)
    _check_prose("description", reflection.description, limits.description)
    if not reflection.description.strip():
        raise ReflectionRejected(Reason.WRONG_SCHEMA, "description is empty")
    if len(reflection.outcome) > limits.outcome:
        raise ReflectionRejected(
            Reason.OVERSIZED, f"outcome has {len(reflection.outcome)} characters > {limits.outcome}"
        )
    if not _OUTCOME.fullmatch(reflection.outcome):
        raise ReflectionRejected(
            Reason.WRONG_SCHEMA, f"outcome {reflection.outcome!r:.40} is not a lower-case word"
        )
    if len(reflection.recommendations) > limits.recommendations:
        raise ReflectionRejected(
            Reason.OVERSIZED,
            f"{len(reflection.recommendations)} recommendations > {limits.recommendations}",
        )
    for i, rec in enumerate(reflection.recommendations):
        _check_prose(f"recommendations[{i}]", rec, limits.recommendation)
    if len(reflection.tags) > limits.tags:
        raise ReflectionRejected(Reason.OVERSIZED, f"{len(reflection.tags)} tags > {limits.tags}")
    for i, tag in enumerate(reflection.tags):
        if len(tag) > limits.tag:
            raise ReflectionRejected(Reason.OVERSIZED, f"tags[{i}] has {len(tag)} characters")
        if not _TAG.fullmatch(tag):
            raise ReflectionRejected(
                Reason.WRONG_SCHEMA, f"tags[{i}] is empty or contains whitespace/control characters"
            )
        if tag.startswith(PROVENANCE_TAG_PREFIX) and not allow_provenance_tags:
            raise ReflectionRejected(
                Reason.RESERVED_TAG, f"tags[{i}]: {PROVENANCE_TAG_PREFIX}* is set by the receiver"
            )
    if reflection.author and not _PEER_ID.fullmatch(reflection.author):
        raise ReflectionRejected(Reason.WRONG_SCHEMA, "author is not a peer id")
    if reflection.author and not is_canonical_peer_id(reflection.author):
        raise ReflectionRejected(Reason.BAD_ID, "author is not the canonical spelling of a key")
    if not math.isfinite(reflection.timestamp) or reflection.timestamp < 0:
        raise ReflectionRejected(Reason.WRONG_SCHEMA, "timestamp is not a finite epoch time")
    if reflection.signature:
        if not _SIGNATURE_HEX.fullmatch(reflection.signature):
            raise ReflectionRejected(
                Reason.WRONG_SCHEMA, "signature is not 128 lower-case hex digits"
            )
        if not reflection.author:
            raise ReflectionRejected(Reason.WRONG_SCHEMA, "a signed reflection needs an author")


def validate_reflection(
    obj: Any,
    *,
    limits: ReflectionLimits = DEFAULT_LIMITS,
    allow_provenance_tags: bool = False,
) -> Reflection:
    """Check shape and limits of a reflection given as msgpack bytes, a dict or a struct.

    Does not check the signature (see ``verify_reflection``) nor the outcome: a local
    note about a failure is a fine reflection, it is just not shared.
    Raises ``ReflectionRejected`` with reason ``wrong-schema`` or ``oversized``
    (``reserved-tag`` for ``shared_from_*`` tags unless allowed).
    """
    if isinstance(obj, bytes | bytearray | memoryview):
        size = len(obj)
        if size > limits.encoded_bytes:
            raise ReflectionRejected(Reason.OVERSIZED, f"{size} bytes > {limits.encoded_bytes}")
        try:
            reflection = msgspec.msgpack.decode(obj, type=Reflection)
        except msgspec.DecodeError as exc:
            raise ReflectionRejected(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc
    elif isinstance(obj, Reflection):
        reflection = obj
    else:
        try:
            reflection = msgspec.convert(obj, Reflection)
        except msgspec.ValidationError as exc:
            raise ReflectionRejected(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc
    _check_fields(reflection, limits, allow_provenance_tags)
    size = len(encode_reflection(reflection))
    if size > limits.encoded_bytes:
        raise ReflectionRejected(Reason.OVERSIZED, f"{size} encoded bytes > {limits.encoded_bytes}")
    return reflection


def reflection_to_dict(reflection: Reflection) -> dict[str, Any]:
    """Plain dict (lists, str, float) ready for JSON/msgpack or a DataFrame row."""
    out: dict[str, Any] = msgspec.to_builtins(reflection)
    return out
