"""Fixtures of the chaos / load / fuzz suite (``pytest -m chaos``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from swarm_notebook.signaling import SignalingConfig, SignalingServer


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    srv = SignalingServer(SignalingConfig(port=0))
    await srv.start()
    yield srv
    await srv.close()
