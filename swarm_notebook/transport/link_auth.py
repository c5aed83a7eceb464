"""Proof of identity over a fresh data channel.

Both ends sign one transcript that binds the session, both peer ids, both nonces and both
DTLS certificate fingerprints (read from the offer and the answer). A signaling server that
swapped SDP to sit in the middle would present its own certificate to at least one side, so
the fingerprints that side signs differ from the other's and the proof fails.
"""

from __future__ import annotations

import re

from swarm_notebook.identity import is_canonical_peer_id, verify_signature

LINK_CONTEXT = b"swarm-notebook/link-auth/v1\x00"
_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+)\s+(\S+)\s*$", re.MULTILINE)


def sdp_fingerprints(sdp: str) -> str:
    """The DTLS fingerprints an SDP announces, normalised and sorted."""
    found = sorted(f"{alg.lower()} {value.upper()}" for alg, value in _FINGERPRINT.findall(sdp))
    return ",".join(found)


def transcript(
    *,
    session: str,
    offerer: str,
    answerer: str,
    offerer_nonce: str,
    answerer_nonce: str,
    offer_fingerprints: str,
    answer_fingerprints: str,
) -> bytes:
    fields = [
        session,
        offerer,
        answerer,
        offerer_nonce,
        answerer_nonce,
        offer_fingerprints,
        answer_fingerprints,
    ]
    return LINK_CONTEXT + "\x00".join(fields).encode()


def link_id_problem(peer_id: str) -> str | None:
    """``"bad-id"`` when ``peer_id`` is not the canonical spelling of a key, else None."""
    return None if is_canonical_peer_id(peer_id) else "bad-id"


def verify_transcript(peer_id: str, signature: bytes, data: bytes) -> bool:
    """True when ``peer_id`` is canonical and signed ``data``."""
    return link_id_problem(peer_id) is None and verify_signature(peer_id, signature, data)
