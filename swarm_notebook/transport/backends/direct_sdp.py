"""The two session-level SDP lines of the direct path.

``a=x-swarm-direct:<host> <port> <token>`` in an offer: the offerer listens there.
``a=x-swarm-direct-ok`` in an answer: the answerer reached it and the link uses it.
WebRTC stacks ignore unknown ``a=x-`` attributes (aiortc and libdatachannel both parse an
SDP that carries them), so a peer on another backend simply answers without ``-ok``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from swarm_notebook.errors import ProtocolError
from swarm_notebook.reasons import Reason

OFFER_ATTRIBUTE = "x-swarm-direct"
OK_ATTRIBUTE = "x-swarm-direct-ok"
TOKEN_HEX = 32  # secrets.token_hex(16)

_OFFER = re.compile(r"^a=x-swarm-direct:(\S+) (\d{1,5}) ([0-9a-f]{32})\s*$", re.MULTILINE)
_OFFER_ANY = re.compile(r"^a=x-swarm-direct:", re.MULTILINE)
_OK = re.compile(r"^a=x-swarm-direct-ok\s*$", re.MULTILINE)
_FINGERPRINT = re.compile(r"^a=fingerprint:sha-256\s+(\S+)\s*$", re.MULTILINE | re.IGNORECASE)
_HOST_CANDIDATE = re.compile(
    r"^a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ host", re.MULTILINE | re.IGNORECASE
)


@dataclass(frozen=True)
class DirectOffer:
    host: str
    port: int
    token: str


def add_session_line(sdp: str, line: str) -> str:
    """``sdp`` with ``a=<line>`` at session level (before the first media section)."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    index = sdp.find(f"{newline}m=")
    if index < 0:
        return sdp.rstrip("\r\n") + newline + f"a={line}" + newline
    return sdp[: index + len(newline)] + f"a={line}" + newline + sdp[index + len(newline) :]


def offer_line(host: str, port: int, token: str) -> str:
    return f"{OFFER_ATTRIBUTE}:{host} {port} {token}"


def parse_offer(sdp: str) -> DirectOffer | None:
    """The offer's direct endpoint; ``None`` without a line; a ``ProtocolError`` for a line
    we cannot use (two of them, a bad port, an address that is not an IP)."""
    if _OFFER_ANY.search(sdp) is None:
        return None
    found = _OFFER.findall(sdp)
    if len(found) != 1:
        raise ProtocolError(
            Reason.MALFORMED, "expected one 'a=x-swarm-direct:host port token' line"
        )
    host, port_text, token = found[0]
    port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(Reason.MALFORMED, f"not an IP address: {host[:64]!r}") from None
    if not 0 < port < 65536:
        raise ProtocolError(Reason.MALFORMED, f"bad port {port}")
    return DirectOffer(host, port, token)


def accepted(sdp: str) -> bool:
    return _OK.search(sdp) is not None


def sha256_fingerprint(sdp: str) -> str | None:
    """The one SHA-256 ``a=fingerprint`` of an SDP (upper case), ``None`` if not exactly one."""
    found = {value.upper() for value in _FINGERPRINT.findall(sdp)}
    return found.pop() if len(found) == 1 else None


def host_candidate_addresses(sdp: str) -> list[str]:
    """Addresses of the SDP's host candidates, IPv4 first, in order, without repeats."""
    seen: list[str] = []
    for address in _HOST_CANDIDATE.findall(sdp):
        if address not in seen:
            seen.append(address)
    return sorted(seen, key=lambda a: ":" in a)
