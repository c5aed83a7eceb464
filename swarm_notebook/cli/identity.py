"""``swarm-notebook identity show|rotate``: this profile's key.

``rotate`` makes a new key (the peer id changes) and keeps the old one as
``identity.pem.old`` (then ``.old.1``...). Rosters this profile owns are re-signed with
the new key and list the new id in place of the old one; for rosters owned by someone
else, the owner must swap the ids (``roster remove OLD`` and ``roster add NEW``).
Stop every process using the profile first: a running peer keeps its old key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swarm_notebook.errors import SwarmError
from swarm_notebook.identity import Identity, default_profile_dir
from swarm_notebook.membership.roster import ROSTER_DIR, rekeyed, save_roster, verified_roster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=Path, default=None)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("show", help="print this profile's peer id")
    sub.add_parser("rotate", help="make a new key; keep the old one as a backup")


def run(args: argparse.Namespace) -> int:
    profile = args.profile or default_profile_dir()
    try:
        if args.action == "show":
            print(Identity.load_or_create(profile).peer_id)
            return 0
        old = Identity.load_or_create(profile)
        new, backup = Identity.rotate(profile)
        print(f"new peer id  {new.peer_id}")
        print(f"old peer id  {old.peer_id}  (key kept in {backup})")
        for path in sorted((profile / ROSTER_DIR).glob("*.json")):
            roster = verified_roster(json.loads(path.read_text()))
            if roster.owner == old.peer_id:
                updated = rekeyed(old.peer_id, new, roster)
                save_roster(profile, updated)
                print(f"roster of {roster.room!r}: re-signed by the new key (v{updated.version})")
            elif old.peer_id in roster.ids:
                print(
                    f"roster of {roster.room!r} is owned by {roster.owner[:16]}: ask them to "
                    f"run `roster remove {old.peer_id}` and `roster add {new.peer_id}`"
                )
    except (SwarmError, OSError, ValueError) as exc:
        print(f"swarm-notebook identity: {exc}", file=sys.stderr)
        return 2
    return 0
