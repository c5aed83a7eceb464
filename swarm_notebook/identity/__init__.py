"""Peer identity: an Ed25519 key pair per profile; the peer id is derived from the public key."""

from swarm_notebook.errors import IdentityError
from swarm_notebook.identity.keys import (
    Identity,
    default_profile_dir,
    is_canonical_peer_id,
    public_key_from_peer_id,
    require_canonical,
    verify_signature,
)

__all__ = [
    "Identity",
    "IdentityError",
    "default_profile_dir",
    "is_canonical_peer_id",
    "public_key_from_peer_id",
    "require_canonical",
    "verify_signature",
]
