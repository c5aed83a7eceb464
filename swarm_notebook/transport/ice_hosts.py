"""Choosing which local addresses ICE offers as host candidates.

aioice always skips 127.0.0.1 and offers every other interface. Peers that all live on
one machine (tests, ``swarm-notebook up``) should talk over loopback only, so this lets a
process name its host addresses, e.g. ``SWARM_NOTEBOOK_ICE_HOSTS=127.0.0.1``. aioice reads
them through a module function, so the choice is necessarily process-wide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import aioice.ice

import swarm_notebook.environment as environment

_original: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def host_addresses_from_env(environ: dict[str, str] | None = None) -> list[str] | None:
    value = (os.environ if environ is None else environ).get(environment.ICE_HOSTS, "").strip()
    return [a.strip() for a in value.split(",") if a.strip()] or None


def restrict_host_candidates(addresses: Sequence[str] | None) -> None:
    """Offer only ``addresses`` as ICE host candidates (``None`` restores aioice's choice)."""
    if addresses is None:
        setattr(aioice.ice, "get_host_addresses", _original)  # noqa: B010 (module attribute)
        return
    chosen = list(addresses)

    def chosen_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    setattr(aioice.ice, "get_host_addresses", chosen_addresses)  # noqa: B010 (module attribute)
