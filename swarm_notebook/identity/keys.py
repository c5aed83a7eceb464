"""Ed25519 identities.

The peer id *is* the public key (lower-case base32, no padding: 52 characters of
``[a-z2-7]``), so anyone can check a signature against an id with nothing else in hand,
and no peer can claim an id without holding its private key.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm_notebook.errors import IdentityError
from swarm_notebook.reasons import Reason

PROFILE_ENV = "SWARM_NOTEBOOK_PROFILE"
KEY_FILE = "identity.pem"
PEER_ID_LENGTH = 52


def default_profile_dir(env: dict[str, str] | None = None) -> Path:
    """The profile folder: ``$SWARM_NOTEBOOK_PROFILE`` or ``~/.swarm_notebook/default``."""
    environ = os.environ if env is None else env
    override = environ.get(PROFILE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".swarm_notebook" / "default"


def _peer_id_for(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the public key behind a peer id; raises ``IdentityError`` if it is not one."""
    if not isinstance(peer_id, str) or len(peer_id) != PEER_ID_LENGTH:
        raise IdentityError(Reason.BAD_ID, f"not a peer id: {peer_id!r:.80}")
    try:
        raw = base64.b32decode(peer_id.upper() + "====")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise IdentityError(Reason.BAD_ID, f"not a peer id: {peer_id!r:.80}") from exc


def verify_signature(peer_id: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key behind ``peer_id``."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except (IdentityError, InvalidSignature, TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A peer's key pair.

    >>> ident = Identity.generate()
    >>> verify_signature(ident.peer_id, ident.sign(b"hi"), b"hi")
    True
    """

    private_key: Ed25519PrivateKey
    peer_id: str

    @classmethod
    def generate(cls) -> Identity:
        key = Ed25519PrivateKey.generate()
        return cls(private_key=key, peer_id=_peer_id_for(key.public_key()))

    @classmethod
    def load_or_create(cls, profile_dir: Path | str | None = None) -> Identity:
        """Load the profile's key, creating it (mode 0600) on first use.

        A key file that exists but cannot be read or parsed raises ``IdentityError``:
        silently replacing it would change the peer's id behind the user's back.
        """
        folder = Path(profile_dir) if profile_dir is not None else default_profile_dir()
        path = folder / KEY_FILE
        if path.exists():
            return cls.load(path)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = cls.generate()
        pem = ident.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes creating the same profile at once must not both win.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return ident

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(Reason.BAD_KEY, f"cannot read identity key {path}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(
                Reason.BAD_KEY,
                f"identity key {path} is corrupt ({exc}); move it away to create a new "
                "identity (your peer id will change)",
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(Reason.BAD_KEY, f"identity key {path} is not an Ed25519 key")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        return cls(private_key=key, peer_id=_peer_id_for(key.public_key()))

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def short_id(self) -> str:
        return self.peer_id[:16]
