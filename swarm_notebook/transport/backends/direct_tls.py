"""TLS 1.3 for the direct path, keyed with the DTLS certificate aiortc already announced.

The offer's ``a=fingerprint`` is the SHA-256 of that certificate, and link
authentication signs the fingerprints of both SDPs. Serving TLS with the same
certificate therefore binds the TCP stream to the offerer's identity key without a CA:
the answerer only accepts a server whose certificate hashes to the offer's fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CertificatePair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def dtls_certificate(pc: Any) -> CertificatePair:
    """The certificate and key an aiortc ``RTCPeerConnection`` uses for DTLS.

    Private aiortc API (1.16): the connection keeps its ``RTCCertificate`` list in the
    name-mangled ``__certificates`` attribute and the certificate holds ``_cert`` and
    ``_key``. aiortc has no public accessor. ``tests/test_direct_backend.py`` checks this
    against the fingerprint aiortc writes into its SDP, so an aiortc that changes it
    fails that test instead of failing links at run time (they would fall back anyway:
    an ``AttributeError`` here makes the offer go out without the direct line).
    """
    certificate = pc._RTCPeerConnection__certificates[0]
    cert, key = certificate._cert, certificate._key
    if not isinstance(cert, x509.Certificate) or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AttributeError("aiortc's DTLS certificate is not an x509 / EC key pair")
    return cert, key


def fingerprint(der: bytes) -> str:
    """``AB:CD:...``, the SDP spelling of a certificate's SHA-256 digest."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path ``ssl`` can load ``data`` from; the key is never left on disk.

    ``SSLContext.load_cert_chain`` reads only files. An anonymous in-memory file is used
    where the kernel has one; otherwise a private temporary file, removed at once.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("swarm-direct-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    handle, path = tempfile.mkstemp(prefix="swarm-direct-")  # mode 0600
    try:
        os.write(handle, data)
        os.close(handle)
        yield path
    finally:
        os.unlink(path)


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    """TLS 1.3 only; the client is not asked for a certificate (the token and the link's
    proof of identity stand for it)."""
    cert, key = pair
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with _pem_file(pem) as path:
        context.load_cert_chain(path)
    return context


def client_context() -> ssl.SSLContext:
    """No CA and no host name: the server's certificate is checked against the offer's
    fingerprint after the handshake, before anything is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(ssl_object: Any) -> str | None:
    """The SHA-256 fingerprint of the certificate the other end presented."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return None if not der else fingerprint(der)
