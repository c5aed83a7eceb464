"""Shared test settings.

All peers in the tests live on this machine: keep their ICE traffic on loopback (aioice
would otherwise offer the machine's other interfaces). Child processes inherit this.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

os.environ.setdefault("SWARM_NOTEBOOK_ICE_HOSTS", "127.0.0.1")

from swarm_notebook.signaling import SignalingConfig, SignalingServer
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    """A real signaling server on a free loopback port, closed after the test."""
    srv = SignalingServer(SignalingConfig(port=0))
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    """One real sandbox child (bubblewrap); modules that need another shape define their own."""
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=1024)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A datagram socket pair, as between a sandbox pool and its child's fd socket."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield a, b
    a.close()
    b.close()
