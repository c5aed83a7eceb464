"""The ICE sockets of an aiortc link get buffers that hold a burst (see socket_buffers)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from swarm_notebook.transport.backends.aiortc_backend import AiortcBackend
from swarm_notebook.transport.backends.base import BackendConfig
from swarm_notebook.transport.socket_buffers import UDP_BUFFER_BYTES, widen, widen_ice_sockets


def _rcvbufs(backend: AiortcBackend) -> list[int]:
    protocols = backend.raw.sctp.transport.transport._connection._protocols
    return [
        p.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        for p in protocols
    ]


async def test_both_ends_of_a_loopback_link_widen_their_ice_sockets() -> None:
    config = BackendConfig(host_addresses=["127.0.0.1"])
    offerer, answerer = AiortcBackend(config), AiortcBackend(config)
    try:
        opened = asyncio.Event()
        channel = offerer.create_channel("data")
        channel.events.on_open = opened.set
        offer = await offerer.create_offer()
        await answerer.set_remote_description(offer, "offer")
        answer = await answerer.create_answer()
        await offerer.set_remote_description(answer, "answer")
        await asyncio.wait_for(opened.wait(), 30)
        for end in (offerer, answerer):
            sizes = _rcvbufs(end)
            assert sizes, "the link gathered no UDP socket"
            # Linux reports twice what was set; as root the request passes rmem_max.
            assert all(size >= UDP_BUFFER_BYTES for size in sizes), sizes
    finally:
        await offerer.close()
        await answerer.close()


def test_widen_keeps_the_default_when_the_socket_refuses() -> None:
    class Refusing:
        def setsockopt(self, *args: object) -> None:
            raise PermissionError("not allowed")

        def getsockopt(self, *args: object) -> int:
            return 212992

    assert widen(Refusing()) == 212992


def test_a_connection_without_ice_transport_is_left_alone() -> None:
    class NoSctp:
        sctp = None

    assert widen_ice_sockets(NoSctp()) == []


@pytest.mark.parametrize("size", [1 << 20, UDP_BUFFER_BYTES])
def test_widen_reports_what_the_kernel_gave(size: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = widen(sock, size)
        assert got == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert got >= size  # root here: forced past rmem_max if need be
