"""``swarm-notebook roster add|remove|show|import``: who may vote in a room.

The roster is signed by the room's owner: the profile that ran the first ``roster add``
for the room. Only that profile can change it. Members on other machines either get a
copy of the file (``roster show --json > roster.json`` then ``roster import roster.json``)
or run with ``--roster-owner <owner id>`` and receive it from the room.
A running peer reads the file at start; the notebook's ``%swarm roster add`` changes the
live roster and sends it to the room at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarm_notebook.coordinator.config import DEFAULT_ROOM
from swarm_notebook.errors import SwarmError, UsageError
from swarm_notebook.identity import Identity, default_profile_dir, require_canonical
from swarm_notebook.membership.roster import (
    Roster,
    load_roster,
    roster_path,
    roster_to_dict,
    save_roster,
    verified_roster,
    with_member,
    without_member,
)
from swarm_notebook.reasons import Reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", default=DEFAULT_ROOM)
    parser.add_argument("--profile", type=Path, default=None, help="profile folder (the owner's)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="put a peer on the roster (creates it, owned by you)")
    add.add_argument("peer_id")
    add.add_argument("--name", default="", help="a name people recognise")
    add.add_argument(
        "--owner-name", default="owner", help="your own name on a new roster (default owner)"
    )
    remove = sub.add_parser("remove", help="take a peer off the roster")
    remove.add_argument("peer_id")
    show = sub.add_parser("show", help="print the roster")
    show.add_argument("--json", action="store_true", help="the signed roster, for `import`")
    imp = sub.add_parser("import", help="adopt a roster file signed by its owner")
    imp.add_argument("file", type=Path)


def run(args: argparse.Namespace) -> int:
    profile = args.profile or default_profile_dir()
    try:
        if args.action == "show":
            return show(profile, args.room, as_json=args.json)
        if args.action == "import":
            roster = verified_roster(json.loads(args.file.read_text()))
            save_roster(profile, roster)
            print(
                f"imported roster v{roster.version} of room {roster.room!r} "
                f"(owner {roster.owner[:16]}) into {profile}"
            )
            return 0
        owner = Identity.load_or_create(profile)
        current = load_roster(profile, args.room)
        peer_id = require_canonical(args.peer_id)
        if args.action == "add":
            if current is None and peer_id != owner.peer_id:
                current = with_member(owner, None, args.room, owner.peer_id, args.owner_name)
            updated = with_member(owner, current, args.room, peer_id, args.name)
        else:
            if current is None:
                raise UsageError(Reason.NOT_FOUND, f"room {args.room!r} has no roster in {profile}")
            updated = without_member(owner, current, peer_id)
        path = save_roster(profile, updated)
    except (SwarmError, OSError, ValueError) as exc:
        print(f"swarm-notebook roster: {exc}", file=sys.stderr)
        return 2
    print(f"roster v{updated.version} of room {args.room!r} saved to {path}")
    print_roster(updated)
    return 0


def show(profile: Path, room: str, *, as_json: bool) -> int:
    roster = load_roster(profile, room)
    if roster is None:
        print(
            f"room {room!r} has no roster in {profile}: it is open (anyone connected votes, "
            "high-risk proposals are refused)"
        )
        return 1
    if as_json:
        print(json.dumps(roster_to_dict(roster), indent=1))
        return 0
    print(f"{roster_path(profile, room)}")
    print_roster(roster)
    return 0


def print_roster(roster: Roster) -> None:
    print(f"owner  {roster.owner}  version {roster.version}  ({len(roster.members)} members)")
    for member in roster.members:
        mark = "*" if member.peer_id == roster.owner else " "
        print(f"{mark} {member.peer_id}  {member.name}")
