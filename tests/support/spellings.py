"""Other spellings of one key's peer id: what a lenient base32 decoder accepts as the same key.

The 52nd base32 character carries 5 bits of which only the top 1 is key material, so 15
other final characters decode to the same 32 bytes; upper and mixed case decode too.
"""

from __future__ import annotations

import base64

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def decodes_to_same_key(a: str, b: str) -> bool:
    """What the lenient decoder of the original code accepted."""
    return base64.b32decode(a.upper() + "====") == base64.b32decode(b.upper() + "====")


def other_spellings(peer_id: str) -> list[str]:
    """16+ strings that a lenient decoder maps to ``peer_id``'s key, ``peer_id`` excluded:
    the 15 other endings, then the upper-case and a mixed-case spelling."""
    last = ALPHABET.index(peer_id[-1])
    endings = [peer_id[:-1] + ALPHABET[(last & 0b10000) | low] for low in range(16)]
    out = [e for e in endings if e != peer_id]
    out += [peer_id.upper(), peer_id[:26].upper() + peer_id[26:]]
    assert all(decodes_to_same_key(s, peer_id) for s in out)
    return out


def lenient_verify(peer_id: str, signature: bytes, data: bytes) -> bool:
    """The original signature check: any spelling that decodes to the key passes."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b32decode(peer_id.upper() + "====")
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
