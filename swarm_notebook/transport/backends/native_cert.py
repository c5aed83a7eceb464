"""One DTLS certificate per process for the native backend, made in Python.

Without one, libdatachannel generates a certificate per connection on its worker pool and
``set_local_description`` waits for it while the binding holds the GIL; a worker busy in
one of our callbacks waits for the GIL in turn, and neither moves (seen in the chaos
suite). A certificate handed over as PEM text is loaded synchronously instead. Sharing
it between links is safe: each link's proof of identity signs that link's own session,
nonces and both fingerprints (``link_auth``). The key never touches the disk.
"""

from __future__ import annotations

import datetime
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 30  # a process older than this makes a new one (see ``pem_pair``)

_lock = threading.Lock()
_pair: tuple[str, str, datetime.datetime] | None = None


def _make() -> tuple[str, str, datetime.datetime]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm-notebook")])
    now = datetime.datetime.now(datetime.UTC)
    expires = now + datetime.timedelta(days=VALID_DAYS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(expires)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert_pem, key_pem, expires


def pem_pair() -> tuple[str, str]:
    """(certificate PEM, private key PEM), renewed a day before they expire."""
    global _pair
    with _lock:
        now = datetime.datetime.now(datetime.UTC)
        if _pair is None or _pair[2] - now < datetime.timedelta(days=1):
            _pair = _make()
        return _pair[0], _pair[1]
