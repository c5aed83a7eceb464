"""Ed25519 identities.

The peer id *is* the public key (lower-case base32, no padding: 52 characters of
``[a-z2-7]``), so anyone can check a signature against an id with nothing else in hand,
and no peer can claim an id without holding its private key.

One key has exactly one id. 52 base32 characters carry 260 bits for a 256-bit key, and a
lenient decoder ignores the last character's low 4 bits and letter case, so 16+ strings
decode to the same key. Every place that names a peer (signaling rooms, link auth, cards,
ballots, reflections) counts distinct strings, so each of those spellings would be a new
"peer": ``is_canonical_peer_id`` / ``require_canonical`` accept only the spelling
``Identity`` itself produces, and ``public_key_from_peer_id`` refuses the others.
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

import swarm_notebook.environment as environment
from swarm_notebook.errors import IdentityError
from swarm_notebook.reasons import Reason

KEY_FILE = "identity.pem"
PEER_ID_LENGTH = 52
BACKUP_SUFFIX = ".old"


def default_profile_dir(env: dict[str, str] | None = None) -> Path:
    """The profile folder: ``$SWARM_NOTEBOOK_PROFILE`` or ``~/.swarm_notebook/default``."""
    environ = os.environ if env is None else env
    override = environ.get(environment.PROFILE)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".swarm_notebook" / "default"


def _peer_id_for(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _decode(peer_id: object) -> Ed25519PublicKey | None:
    """The key behind the *canonical* spelling ``peer_id``, else None."""
    if not isinstance(peer_id, str) or len(peer_id) != PEER_ID_LENGTH:
        return None
    try:
        raw = base64.b32decode(peer_id.upper() + "====")
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        return None
    # Re-encoding is the only test that also rejects upper/mixed case and the 16 endings
    # whose ignored low bits differ: the id must be the one string this key produces.
    return key if _peer_id_for(key) == peer_id else None


def is_canonical_peer_id(peer_id: object) -> bool:
    """True only for the one spelling of a key that ``Identity`` produces.

    >>> ident = Identity.generate()
    >>> is_canonical_peer_id(ident.peer_id), is_canonical_peer_id(ident.peer_id.upper())
    (True, False)
    """
    return _decode(peer_id) is not None


def require_canonical(peer_id: object, what: str = "peer id") -> str:
    """``peer_id`` if it is a canonical peer id; raises ``IdentityError`` (``bad-id``)."""
    if _decode(peer_id) is None:
        raise IdentityError(Reason.BAD_ID, f"{what} {peer_id!r:.80} is not a canonical peer id")
    assert isinstance(peer_id, str)
    return peer_id


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the public key behind a canonical peer id; raises ``IdentityError`` otherwise."""
    key = _decode(peer_id)
    if key is None:
        raise IdentityError(Reason.BAD_ID, f"not a canonical peer id: {peer_id!r:.80}")
    return key


def verify_signature(peer_id: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key behind ``peer_id``
    (which must be that key's canonical spelling)."""
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

    @classmethod
    def rotate(cls, profile_dir: Path | str | None = None) -> tuple[Identity, Path | None]:
        """Replace the profile's key with a new one; the old key file is kept as a backup
        (``identity.pem.old``, then ``.old.1``...). Returns the new identity and the backup.
        """
        folder = Path(profile_dir) if profile_dir is not None else default_profile_dir()
        path = folder / KEY_FILE
        backup: Path | None = None
        if path.exists():
            cls.load(path)  # never move away a key we could not have read back
            backup = path.with_name(KEY_FILE + BACKUP_SUFFIX)
            n = 0
            while backup.exists():
                n += 1
                backup = path.with_name(f"{KEY_FILE}{BACKUP_SUFFIX}.{n}")
            os.replace(path, backup)
        return cls.load_or_create(folder), backup

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def short_id(self) -> str:
        return self.peer_id[:16]
