"""Short-lived TURN credentials for admitted peers (coturn's REST-API scheme).

coturn started with ``use-auth-secret`` and ``static-auth-secret=S`` accepts any username
``<expiry unix time>:<anything>`` whose password is ``base64(HMAC-SHA1(S, username))``
until the expiry passes. The signaling server knows ``S``; peers never do, so a team runs
one signaling server and one coturn and no peer configures ICE by hand.

>>> issuer = TurnIssuer(TurnConfig(urls=("turn:198.51.100.7:3478",), secret="s"),
...                     clock=lambda: 1000.0)
>>> servers, expires = issuer.issue("ab" * 32)
>>> servers[0]["username"], expires
('4600:abababababababababababababababababababababababababababababababab', 4600.0)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Issued credentials are asked to be renewed once this share of their life is gone.
RENEW_AT_FRACTION = 0.8
MIN_TTL_S = 60.0


@dataclass(frozen=True)
class TurnConfig:
    """What ``swarm-notebook signal --ice-server/--turn-url/--turn-secret/--turn-ttl`` set."""

    urls: tuple[str, ...] = ()
    secret: str | None = None
    ttl_s: float = 3600.0
    stun_urls: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.urls and not self.secret:
            raise ValueError("--turn-url needs --turn-secret (coturn's static-auth-secret)")
        if self.secret and not self.urls:
            raise ValueError("--turn-secret needs at least one --turn-url")
        if self.ttl_s < MIN_TTL_S:
            raise ValueError(f"--turn-ttl must be at least {MIN_TTL_S:g} s, got {self.ttl_s:g}")
        for url in self.urls:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"--turn-url expects turn:HOST[:PORT] or turns:..., got {url!r}")
        for url in self.stun_urls:
            if not url.startswith("stun:"):
                raise ValueError(f"--ice-server expects stun:HOST[:PORT], got {url!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.urls or self.stun_urls)


def turn_password(secret: str, username: str) -> str:
    """coturn's REST-API password for ``username``."""
    mac = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


class TurnIssuer:
    """Issues the ICE server list a peer gets in its join acknowledgement."""

    def __init__(self, config: TurnConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.issued = 0

    def issue(self, peer_id: str) -> tuple[list[dict[str, Any]], float | None]:
        """ICE servers for ``peer_id`` and when their credentials expire (Unix seconds)."""
        servers: list[dict[str, Any]] = [{"urls": url} for url in self.config.stun_urls]
        expires: float | None = None
        if self.config.urls and self.config.secret:
            expiry = int(self._clock() + self.config.ttl_s)
            username = f"{expiry}:{peer_id}"
            servers.append(
                {
                    "urls": list(self.config.urls),
                    "username": username,
                    "credential": turn_password(self.config.secret, username),
                }
            )
            expires = float(expiry)
        self.issued += 1
        return servers, expires
