"""Which roster a peer votes under, and how a new version reaches it.

A peer trusts exactly one roster owner for its room: itself when it made the roster, the
owner named on the command line (``--roster-owner``), or the owner of the roster file
already in its profile. Rosters received from the swarm are taken only when signed by that
owner, for this room, and newer than the one held; everything else is counted by reason
and dropped. Without a trusted owner the room is *open*: no roster is ever accepted from
the swarm (a throwaway key could otherwise declare itself the electorate).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from swarm_notebook.errors import RosterError
from swarm_notebook.identity import Identity, is_canonical_peer_id
from swarm_notebook.membership.roster import (
    Roster,
    load_roster,
    roster_hash,
    roster_path,
    roster_problem,
    roster_to_dict,
    save_roster,
    verified_roster,
)
from swarm_notebook.reasons import Reason

log = logging.getLogger(__name__)


class Electorate:
    """The room's roster as this peer holds it (None: an open room)."""

    def __init__(
        self,
        identity: Identity,
        room: str,
        *,
        profile_dir: Path | None = None,
        trusted_owner: str | None = None,
        roster: Roster | None = None,
    ) -> None:
        if trusted_owner is not None and not is_canonical_peer_id(trusted_owner):
            raise RosterError(Reason.BAD_ID, f"roster owner {trusted_owner!r:.60} is not a peer id")
        self.identity = identity
        self.room = room
        self.profile_dir = profile_dir
        if roster is None and profile_dir is not None:
            roster = load_roster(profile_dir, room)
        if roster is not None:
            problem = roster_problem(roster, trusted_owner)
            if problem == Reason.UNTRUSTED_OWNER:
                where = roster_path(profile_dir, room) if profile_dir else "the given roster"
                raise RosterError(
                    problem,
                    f"{where} is owned by {roster.owner[:16]}, not by the trusted owner "
                    f"{str(trusted_owner)[:16]}: remove it, or trust its owner instead",
                )
            if problem is not None:
                raise RosterError(problem, f"the roster for {room!r:.40} does not verify")
            if roster.room != room:
                raise RosterError(Reason.WRONG_SCHEMA, f"the roster is for {roster.room!r:.40}")
        self.roster: Roster | None = roster
        self.trusted_owner: str | None = trusted_owner or (roster.owner if roster else None)
        self.rejections: Counter[str] = Counter()
        self.updates = 0

    @property
    def is_open(self) -> bool:
        return self.roster is None

    @property
    def owned(self) -> bool:
        return self.roster is not None and self.roster.owner == self.identity.peer_id

    def is_member(self, peer_id: str) -> bool:
        return self.roster is not None and peer_id in self.roster.ids

    def hash(self) -> str:
        return roster_hash(self.roster) if self.roster is not None else ""

    def install(self, roster: Roster) -> None:
        """Adopt a roster this peer made or was handed locally (CLI, magic); saved."""
        problem = roster_problem(roster, self.trusted_owner)
        if problem is not None:
            raise RosterError(problem, "the roster does not verify against the trusted owner")
        if roster.room != self.room:
            raise RosterError(Reason.WRONG_SCHEMA, f"the roster is for {roster.room!r:.40}")
        self.roster = roster
        self.trusted_owner = roster.owner
        self.updates += 1
        if self.profile_dir is not None:
            save_roster(self.profile_dir, roster)

    def offer(self, obj: Any, sender: str) -> str | None:
        """A roster received from ``sender``; None when adopted, else the reason it was not."""
        try:
            roster = verified_roster(obj, self.trusted_owner)
        except RosterError as exc:
            return self._reject(exc.reason, sender)
        if self.trusted_owner is None:
            return self._reject(Reason.UNTRUSTED_OWNER, sender)
        if roster.room != self.room:
            return self._reject(Reason.WRONG_SCHEMA, sender)
        if self.roster is not None and roster.version <= self.roster.version:
            if roster_hash(roster) == roster_hash(self.roster):
                return None  # the one we hold: nothing to do, nothing wrong
            return self._reject(Reason.STALE_ROSTER, sender)
        self.roster = roster
        self.updates += 1
        if self.profile_dir is not None:
            save_roster(self.profile_dir, roster)
        log.info("roster for %r is now version %d from %s", self.room, roster.version, sender[:16])
        return None

    def _reject(self, reason: str, sender: str) -> str:
        self.rejections[reason] += 1
        log.info("roster from %s refused: %s", sender[:16], reason)
        return reason

    def describe(self) -> dict[str, Any]:
        """For ``get_stats()`` and ``%swarm roster``."""
        if self.roster is None:
            return {"electorate": "open", "owner": self.trusted_owner, "members": []}
        return {
            "electorate": "roster",
            "owner": self.roster.owner,
            "version": self.roster.version,
            "hash": self.hash(),
            "members": [{"peer_id": m.peer_id, "name": m.name} for m in self.roster.members],
            "rejections": dict(self.rejections),
        }

    def as_dict(self) -> dict[str, Any] | None:
        return roster_to_dict(self.roster) if self.roster is not None else None
