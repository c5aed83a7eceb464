"""Choosing a transport backend: names, the environment, and a clear error for each misuse."""

from __future__ import annotations

import pytest

import swarm_notebook.environment as environment
from swarm_notebook.errors import TransportBackendError, UsageError
from swarm_notebook.identity import Identity
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.aiortc_backend import AiortcBackend
from swarm_notebook.transport.backends.select import (
    backend_factory,
    backend_name,
    native_available,
)
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig


def test_config_wins_over_the_environment_which_wins_over_the_default() -> None:
    env = {environment.TRANSPORT_BACKEND: "native"}
    assert backend_name(None, {}) == "aiortc"
    assert backend_name(None, env) == "native"
    assert backend_name("aiortc", env) == "aiortc"
    assert backend_name(None, {environment.TRANSPORT_BACKEND: " native "}) == "native"


def test_an_unknown_backend_is_a_usage_error_naming_the_choices() -> None:
    with pytest.raises(TransportBackendError) as err:
        backend_name(None, {environment.TRANSPORT_BACKEND: "webrtc-rs"})
    assert isinstance(err.value, UsageError)
    assert err.value.reason == Reason.BAD_TRANSPORT_BACKEND
    assert "aiortc, native" in err.value.message and "'webrtc-rs'" in err.value.message


def test_the_mesh_refuses_an_unusable_backend_before_connecting() -> None:
    with pytest.raises(TransportBackendError):
        mesh_transport(
            Identity.generate(), "ws://127.0.0.1:9/ws", "r", config=MeshConfig(backend="x")
        )


def test_native_without_its_library_says_how_to_get_it() -> None:
    if native_available():
        assert backend_factory("native").__name__ == "NativeBackend"
        return
    with pytest.raises(TransportBackendError) as err:
        backend_factory("native")
    assert err.value.reason == Reason.BACKEND_UNAVAILABLE
    assert "swarm_notebook[native]" in err.value.message and "3.13" in err.value.message


def test_aiortc_is_the_default_and_named_in_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(environment.TRANSPORT_BACKEND, raising=False)
    assert backend_factory(backend_name()) is AiortcBackend
    transport = mesh_transport(Identity.generate(), "ws://127.0.0.1:9/ws", "r")
    assert transport.backend == "aiortc" and transport.stats()["backend"] == "aiortc"
