"""A room's roster: the members who may vote, signed by the room's owner.

New keys cost nothing, so "one ballot per connected peer" lets anyone who can reach the
room outvote everyone else. A roster names the electorate instead: a list of member ids
(with names for people to read), signed by the room's owner. Consensus counts ballots only
from roster members and computes its quorum over the roster; the signed roster travels in
every result, so anyone holding the owner's id can re-check a vote anywhere.

Trust is anchored in the owner's id, never in whoever sent a roster: a peer accepts a
roster only if it is signed by the owner it already trusts (it made the roster itself, the
owner was named on the command line, or the roster file was put in its profile).

File format (``<profile>/rosters/<room>.json``)::

    {"room": "lab", "owner": "<peer id>", "version": 3, "issued_at": 1700000000.0,
     "members": [{"peer_id": "<peer id>", "name": "alice"}, ...], "signature": "<hex>"}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec

from swarm_notebook.errors import RosterError
from swarm_notebook.identity import Identity, is_canonical_peer_id, verify_signature
from swarm_notebook.reasons import Reason

ROSTER_CONTEXT = b"swarm-notebook/roster/v1\x00"
ROSTER_DIR = "rosters"
MAX_ROSTER_MEMBERS = 256
MAX_NAME_LENGTH = 64
MAX_ROOM_LENGTH = 128


class RosterMember(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    peer_id: str
    name: str = ""


class Roster(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The signed electorate of ``room``; ``members`` are sorted by id, ids unique."""

    room: str
    owner: str
    version: int
    issued_at: float
    members: tuple[RosterMember, ...]
    signature: str = ""

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.peer_id for m in self.members)

    def name_of(self, peer_id: str) -> str | None:
        return next((m.name for m in self.members if m.peer_id == peer_id), None)


_encoder = msgspec.msgpack.Encoder()


def _payload(r: Roster) -> bytes:
    return ROSTER_CONTEXT + _encoder.encode(
        [
            r.room,
            r.owner,
            int(r.version),
            float(r.issued_at),
            [[m.peer_id, m.name] for m in r.members],
        ]
    )


def roster_hash(roster: Roster) -> str:
    """Hex sha256 over the signed payload: what a proposal binds itself to."""
    return hashlib.sha256(_payload(roster)).hexdigest()


def _members(members: Mapping[str, str] | Iterable[RosterMember]) -> tuple[RosterMember, ...]:
    if isinstance(members, Mapping):
        items = [RosterMember(peer_id=k, name=v) for k, v in members.items()]
    else:
        items = list(members)
    by_id = {m.peer_id: m for m in items}
    return tuple(by_id[k] for k in sorted(by_id))


def make_roster(
    owner: Identity,
    room: str,
    members: Mapping[str, str] | Iterable[RosterMember],
    *,
    version: int = 1,
    now: float | None = None,
) -> Roster:
    """Sign a roster of ``members`` (id -> name) for ``room``; raises ``RosterError``.

    >>> owner = Identity.generate()
    >>> r = make_roster(owner, "lab", {owner.peer_id: "owner"})
    >>> roster_problem(r), r.ids == (owner.peer_id,)
    (None, True)
    """
    unsigned = Roster(
        room=room,
        owner=owner.peer_id,
        version=version,
        issued_at=float(time.time() if now is None else now),
        members=_members(members),
    )
    problem = _shape_problem(unsigned)
    if problem is not None:
        raise RosterError(problem[0], problem[1])
    return msgspec.structs.replace(unsigned, signature=owner.sign(_payload(unsigned)).hex())


def _shape_problem(r: Roster) -> tuple[Reason, str] | None:
    if not r.room or len(r.room) > MAX_ROOM_LENGTH or not r.room.isprintable():
        return Reason.WRONG_SCHEMA, "room must be 1..128 printable characters"
    if not is_canonical_peer_id(r.owner):
        return Reason.BAD_ID, "the owner is not a canonical peer id"
    if not 1 <= r.version < 2**53 or not math.isfinite(r.issued_at):
        return Reason.WRONG_SCHEMA, "bad version or issued_at"
    if len(r.members) > MAX_ROSTER_MEMBERS:
        return Reason.TOO_MANY_MEMBERS, f"{len(r.members)} members > {MAX_ROSTER_MEMBERS}"
    ids = [m.peer_id for m in r.members]
    if ids != sorted(set(ids)):
        return Reason.WRONG_SCHEMA, "members must be sorted and unique"
    for m in r.members:
        if not is_canonical_peer_id(m.peer_id):
            return Reason.BAD_ID, f"member {m.peer_id!r:.60} is not a canonical peer id"
        if len(m.name) > MAX_NAME_LENGTH or not m.name.isprintable():
            return Reason.WRONG_SCHEMA, "member names are up to 64 printable characters"
    return None


def roster_problem(roster: Roster, trusted_owner: str | None = None) -> str | None:
    """Why ``roster`` cannot be used (a reason code), or None.

    ``trusted_owner``: the owner id the caller trusts; a roster signed by anyone else is
    ``untrusted-owner`` however well it verifies.
    """
    shape = _shape_problem(roster)
    if shape is not None:
        return shape[0].value
    if trusted_owner is not None and roster.owner != trusted_owner:
        return Reason.UNTRUSTED_OWNER.value
    try:
        signature = bytes.fromhex(roster.signature)
    except ValueError:
        return Reason.BAD_SIGNATURE.value
    if not verify_signature(roster.owner, signature, _payload(roster)):
        return Reason.BAD_SIGNATURE.value
    return None


def parse_roster(obj: Any) -> Roster:
    """A roster from a dict / msgpack bytes / struct (shape only; see ``roster_problem``)."""
    try:
        if isinstance(obj, Roster):
            return obj
        if isinstance(obj, bytes | bytearray | memoryview):
            return msgspec.msgpack.decode(obj, type=Roster)
        return msgspec.convert(obj, Roster)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RosterError(Reason.WRONG_SCHEMA, str(exc)[:200]) from exc


def verified_roster(obj: Any, trusted_owner: str | None = None) -> Roster:
    """Parse and verify; raises ``RosterError`` with the reason."""
    roster = parse_roster(obj)
    problem = roster_problem(roster, trusted_owner)
    if problem is not None:
        raise RosterError(problem, f"roster for {roster.room!r:.40} does not verify: {problem}")
    return roster


def roster_to_dict(roster: Roster) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(roster)
    return out


# ---------------------------------------------------------------------------- editing


def with_member(
    owner: Identity, roster: Roster | None, room: str, peer_id: str, name: str
) -> Roster:
    """A new version of ``roster`` (or a first one) that includes ``peer_id``."""
    _require_owner(owner, roster)
    members = {m.peer_id: m.name for m in roster.members} if roster else {}
    members[peer_id] = name
    return make_roster(owner, room, members, version=(roster.version + 1) if roster else 1)


def without_member(owner: Identity, roster: Roster, peer_id: str) -> Roster:
    """A new version of ``roster`` without ``peer_id``; raises if it is not on it."""
    _require_owner(owner, roster)
    members = {m.peer_id: m.name for m in roster.members}
    if members.pop(peer_id, None) is None:
        raise RosterError(Reason.NON_MEMBER, f"{peer_id[:16]} is not on the roster")
    return make_roster(owner, roster.room, members, version=roster.version + 1)


def rekeyed(old_owner_id: str, new_owner: Identity, roster: Roster) -> Roster:
    """The roster re-signed by the owner's new key, the old id replaced by the new one."""
    if roster.owner != old_owner_id:
        raise RosterError(Reason.UNTRUSTED_OWNER, "only the owner's roster follows its key")
    members = {m.peer_id: m.name for m in roster.members}
    if old_owner_id in members:
        members[new_owner.peer_id] = members.pop(old_owner_id)
    return make_roster(new_owner, roster.room, members, version=roster.version + 1)


def _require_owner(owner: Identity, roster: Roster | None) -> None:
    if roster is not None and roster.owner != owner.peer_id:
        raise RosterError(
            Reason.UNTRUSTED_OWNER,
            f"the roster of {roster.room!r:.40} is owned by {roster.owner[:16]}; "
            "only its owner can change it",
        )


# ------------------------------------------------------------------------------- files


def roster_path(profile_dir: Path, room: str) -> Path:
    return profile_dir / ROSTER_DIR / (quote(room, safe="") + ".json")


def load_roster(profile_dir: Path, room: str) -> Roster | None:
    """The roster kept in the profile for ``room``, verified against its own owner; None
    when there is none. A file that exists but does not verify raises ``RosterError``:
    silently falling back to an open room would hand the vote to anyone.
    """
    path = roster_path(profile_dir, room)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RosterError(Reason.WRONG_SCHEMA, f"cannot read roster {path}: {exc}") from exc
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise RosterError(Reason.MALFORMED, f"roster {path} is not JSON: {exc}") from exc
    roster = verified_roster(obj)
    if roster.room != room:
        raise RosterError(Reason.WRONG_SCHEMA, f"roster {path} is for room {roster.room!r:.40}")
    return roster


def save_roster(profile_dir: Path, roster: Roster) -> Path:
    """Write atomically (a reader never sees half a roster)."""
    path = roster_path(profile_dir, roster.room)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(roster_to_dict(roster), indent=1) + "\n")
    os.replace(tmp, path)
    return path
