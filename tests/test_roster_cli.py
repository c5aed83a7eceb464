"""``swarm-notebook roster`` and ``identity rotate`` as real commands on real profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from swarm_notebook.identity import Identity
from swarm_notebook.membership.roster import load_roster, roster_problem


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm_notebook.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_roster_add_remove_show_import_and_identity_rotate(tmp_path: Path) -> None:
    owner_dir, member_dir = tmp_path / "owner", tmp_path / "member"
    owner = Identity.load_or_create(owner_dir)
    alice, bob = Identity.generate(), Identity.generate()
    room = ("--room", "lab", "--profile", str(owner_dir))

    assert cli("roster", *room, "show").returncode == 1  # open room, says so
    added = cli("roster", *room, "add", alice.peer_id, "--name", "alice")
    assert added.returncode == 0, added.stderr
    assert cli("roster", *room, "add", bob.peer_id, "--name", "bob").returncode == 0
    roster = load_roster(owner_dir, "lab")
    assert roster is not None and roster.owner == owner.peer_id and roster.version == 3
    assert {m.name for m in roster.members} == {"owner", "alice", "bob"}

    # Another spelling of a key is not an id; nothing changes.
    bad = cli("roster", *room, "add", alice.peer_id.upper())
    assert bad.returncode == 2 and "canonical" in bad.stderr
    assert cli("roster", *room, "remove", bob.peer_id).returncode == 0
    roster = load_roster(owner_dir, "lab")
    assert roster is not None and bob.peer_id not in roster.ids and roster.version == 4

    # A member adopts the signed file; it cannot change it (not the owner).
    exported = cli("roster", *room, "show", "--json")
    (tmp_path / "roster.json").write_text(exported.stdout)
    member = ("--room", "lab", "--profile", str(member_dir))
    assert cli("roster", *member, "import", str(tmp_path / "roster.json")).returncode == 0
    assert load_roster(member_dir, "lab") == roster
    refused = cli("roster", *member, "add", bob.peer_id)
    assert refused.returncode == 2 and "only its owner" in refused.stderr
    tampered = json.loads(exported.stdout)
    tampered["members"].append({"peer_id": bob.peer_id, "name": "bob"})
    tampered["members"].sort(key=lambda m: m["peer_id"])
    (tmp_path / "evil.json").write_text(json.dumps(tampered))
    assert cli("roster", *member, "import", str(tmp_path / "evil.json")).returncode == 2

    # Rotation: a new key, the old one kept, the owned roster re-signed under the new id.
    rotated = cli("identity", "--profile", str(owner_dir), "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = Identity.load_or_create(owner_dir)
    assert new.peer_id != owner.peer_id
    assert Identity.load(owner_dir / "identity.pem.old").peer_id == owner.peer_id
    after = load_roster(owner_dir, "lab")
    assert after is not None and after.owner == new.peer_id and after.version == 5
    assert new.peer_id in after.ids and owner.peer_id not in after.ids
    assert roster_problem(after, trusted_owner=new.peer_id) is None
    # The member's copy still names the old owner: the new roster is not one it trusts.
    assert roster_problem(after, trusted_owner=owner.peer_id) == "untrusted-owner"
    shown = cli("identity", "--profile", str(owner_dir), "show")
    assert shown.stdout.strip() == new.peer_id
