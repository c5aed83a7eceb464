"""Peer identity: key persistence, permissions, derived ids, refusals."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import swarm_notebook.environment as environment
from swarm_notebook.errors import IdentityError
from swarm_notebook.identity import (
    Identity,
    default_profile_dir,
    public_key_from_peer_id,
    verify_signature,
)
from swarm_notebook.identity.keys import KEY_FILE


def test_key_is_created_once_with_owner_only_permissions(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    first = Identity.load_or_create(profile)
    key = profile / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = Identity.load_or_create(profile)
    assert again.peer_id == first.peer_id  # persisted, never regenerated
    assert Identity.load_or_create(tmp_path / "other").peer_id != first.peer_id


def test_peer_id_is_the_public_key_and_checks_signatures(tmp_path: Path) -> None:
    ident = Identity.generate()
    assert len(ident.peer_id) == 52 and ident.peer_id.isalnum() and ident.peer_id.islower()
    raw = public_key_from_peer_id(ident.peer_id)
    assert raw.public_bytes_raw() == ident.private_key.public_key().public_bytes_raw()
    signature = ident.sign(b"payload")
    assert verify_signature(ident.peer_id, signature, b"payload")
    assert not verify_signature(ident.peer_id, signature, b"other payload")
    assert not verify_signature(Identity.generate().peer_id, signature, b"payload")
    assert not verify_signature("not-a-peer-id", signature, b"payload")
    with pytest.raises(IdentityError):
        public_key_from_peer_id("1" * 52)  # "1" is not in the base32 alphabet


def test_corrupt_or_unreadable_key_is_a_clear_error_never_replaced(tmp_path: Path) -> None:
    profile = tmp_path / "p"
    profile.mkdir()
    key = profile / KEY_FILE
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="corrupt"):
        Identity.load_or_create(profile)
    assert b"garbage" in key.read_bytes()  # left for the owner to inspect
    if os.geteuid() != 0:  # root reads anything; the mode check below still applies
        key.chmod(0o000)
        with pytest.raises(IdentityError, match="cannot read"):
            Identity.load_or_create(profile)


def test_loose_permissions_are_tightened_on_load(tmp_path: Path) -> None:
    profile = tmp_path / "p"
    Identity.load_or_create(profile)
    key = profile / KEY_FILE
    key.chmod(0o644)
    Identity.load_or_create(profile)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_profile_folder_comes_from_the_environment(tmp_path: Path) -> None:
    assert default_profile_dir({environment.PROFILE: str(tmp_path / "x")}) == tmp_path / "x"
    assert default_profile_dir({}).name == "default"
