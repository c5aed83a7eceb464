"""Which backend makes this peer's links: a config field, else the environment, else aiortc."""

from __future__ import annotations

import os
from collections.abc import Callable

import swarm_notebook.environment as environment
from swarm_notebook.errors import TransportBackendError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.base import BackendConfig, PeerBackend

BACKENDS = ("aiortc", "native", "direct")
DEFAULT_BACKEND = "aiortc"

BackendFactory = Callable[[BackendConfig], PeerBackend]


def backend_name(configured: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The chosen backend's name; an unknown name is a ``TransportBackendError``."""
    env = os.environ if environ is None else environ
    name = (configured or env.get(environment.TRANSPORT_BACKEND, "") or DEFAULT_BACKEND).strip()
    if name not in BACKENDS:
        raise TransportBackendError(
            Reason.BAD_TRANSPORT_BACKEND,
            f"unknown transport backend {name!r} (from ${environment.TRANSPORT_BACKEND} or "
            f"the config): choose one of {', '.join(BACKENDS)}",
        )
    return name


def native_available() -> bool:
    """Whether libdatachannel-py can be imported here (Python >= 3.13 with the extra)."""
    try:
        import libdatachannel  # noqa: F401
    except ImportError:
        return False
    return True


def backend_factory(name: str) -> BackendFactory:
    """The constructor of backend ``name``; importing it is deferred until chosen."""
    if name == "native":
        try:
            from swarm_notebook.transport.backends.native_backend import NativeBackend
        except ImportError as exc:
            raise TransportBackendError(
                Reason.BACKEND_UNAVAILABLE,
                f"the native transport backend needs libdatachannel-py ({exc}); install "
                "swarm_notebook[native] on Python >= 3.13, or use the aiortc backend",
            ) from exc
        return NativeBackend
    if name == "aiortc":
        from swarm_notebook.transport.backends.aiortc_backend import AiortcBackend

        return AiortcBackend
    if name == "direct":
        from swarm_notebook.transport.backends.direct_backend import DirectBackend

        return DirectBackend
    return backend_factory(backend_name(name))


def prepare(name: str, host_addresses: list[str] | None) -> None:
    """Process-wide setup a backend needs before its first link (aioice's host list)."""
    if name in ("aiortc", "direct"):  # direct wraps aiortc
        from swarm_notebook.transport.backends.aiortc_backend import prepare as prepare_aiortc

        prepare_aiortc(host_addresses)
