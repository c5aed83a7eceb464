"""Endpoint semantics over the in-memory transport (unit level; real links are tested elsewhere)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from swarm_notebook.errors import RemoteError, RequestTimeout
from swarm_notebook.identity import Identity
from swarm_notebook.transport.base import Refusal
from swarm_notebook.transport.endpoint import OTHER, Endpoint
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport


async def make_pair(net: MemoryNetwork) -> tuple[Endpoint, Endpoint]:
    a = Endpoint(MemoryTransport(Identity.generate(), net, "room"))
    b = Endpoint(MemoryTransport(Identity.generate(), net, "room"))
    await a.transport.start()
    await b.transport.start()
    return a, b


async def close_all(*endpoints: Endpoint) -> None:
    for e in endpoints:
        await e.close()
        await e.transport.close()


async def test_request_reply_and_reregistering_replaces_handler() -> None:
    a, b = await make_pair(MemoryNetwork())
    calls: list[str] = []
    b.register_message_handler("echo", lambda peer, body: calls.append("first") or body)
    b.register_message_handler("echo", lambda peer, body: calls.append("second") or body)
    assert await a.request(b.local_id, "echo", {"x": [1, 2]}) == {"x": [1, 2]}
    assert calls == ["second"]
    await close_all(a, b)


async def test_unknown_type_and_schema_errors_come_back_with_reasons() -> None:
    class Body(msgspec.Struct):
        n: int

    a, b = await make_pair(MemoryNetwork())
    b.register_message_handler("typed", lambda peer, body: body.n * 2, schema=Body)
    assert await a.request(b.local_id, "typed", {"n": 21}) == 42
    with pytest.raises(RemoteError) as err:
        await a.request(b.local_id, "typed", {"n": "x"})
    assert err.value.reason == "wrong-schema"
    with pytest.raises(RemoteError) as err:
        await a.request(b.local_id, "nope", {})
    assert err.value.reason == "unknown-type"
    assert b.rejections["wrong-schema"] == 1 and b.rejections["unknown-type"] == 1
    await close_all(a, b)


async def test_timeout_and_cancellation_reach_the_remote_handler() -> None:
    a, b = await make_pair(MemoryNetwork())
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(peer: str, body: object) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.register_message_handler("slow", slow)
    with pytest.raises(RequestTimeout):
        await a.request(b.local_id, "slow", None, timeout=0.2)
    await asyncio.wait_for(cancelled.wait(), 2)
    started.clear()
    cancelled.clear()
    task = asyncio.create_task(a.request(b.local_id, "slow", None, timeout=30))
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    await asyncio.wait_for(cancelled.wait(), 2)
    await close_all(a, b)


async def test_reply_from_a_different_peer_is_not_accepted() -> None:
    net = MemoryNetwork()
    a, b = await make_pair(net)
    c = Endpoint(MemoryTransport(Identity.generate(), net, "room"))
    await c.transport.start()
    gate = asyncio.Event()

    async def held(peer: str, body: object) -> str:
        await gate.wait()
        return "from b"

    b.register_message_handler("q", held)
    task = asyncio.create_task(a.request(b.local_id, "q", None, timeout=5))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # c forges a reply carrying a's pending correlation id.
    pending_id = next(iter(a._pending))
    await c._send_reply(a.local_id, pending_id, "rpc.reply", "forged")
    await asyncio.sleep(0.01)
    assert not task.done()
    assert a.rejections["unmatched-reply"] == 1
    gate.set()
    assert await task == "from b"
    await close_all(a, b, c)


async def test_broadcast_counts_reached_peers_and_partition_drops_links() -> None:
    net = MemoryNetwork()
    eps = [Endpoint(MemoryTransport(Identity.generate(), net, "r")) for _ in range(4)]
    got: list[str] = []
    for e in eps:
        await e.transport.start()
        e.register_message_handler("hello", lambda peer, body, me=e: got.append(me.local_id))
    assert await eps[0].broadcast("hello", {}) == 3
    net.partition([eps[0].local_id, eps[1].local_id], [eps[2].local_id, eps[3].local_id])
    assert eps[0].transport.connected_peers() == [eps[1].local_id]
    assert await eps[0].broadcast("hello", {}) == 1
    net.heal()
    assert len(eps[0].transport.connected_peers()) == 3
    await asyncio.sleep(0.01)
    assert len(got) == 4
    await close_all(*eps)


async def test_counters_are_keyed_only_by_known_message_types() -> None:
    # Finding 10: 86k peer-chosen types grew Endpoint.received by 11 MB and never shrank.
    a, b = await make_pair(MemoryNetwork())
    b.register_message_handler("echo", lambda peer, body: body)
    for i in range(5000):
        await a.send(b.local_id, f"made-up-{i}", None)
    assert await a.request(b.local_id, "echo", 1) == 1  # ordered: every made-up one is in
    assert b.received[OTHER] == 5000 and b.received["echo"] == 1
    assert set(b.received) <= {OTHER, "echo", "rpc.reply", "rpc.error", "rpc.cancel"}
    assert set(b.rejections) == {"unknown-type"} and b.rejections["unknown-type"] == 5000
    await close_all(a, b)


async def test_a_refusal_reported_by_the_transport_fails_the_request_at_once() -> None:
    a, b = await make_pair(MemoryNetwork())
    started = asyncio.Event()

    async def slow(peer: str, body: object) -> object:
        started.set()
        await asyncio.sleep(3600)
        return body

    b.register_message_handler("slow", slow)
    request = asyncio.ensure_future(a.request(b.local_id, "slow", 1, timeout=3600))
    await started.wait()
    (msg_id,) = a._pending
    a.transport.callbacks.on_refused(b.local_id, Refusal("reassembly-full", "full", msg_id))
    with pytest.raises(RemoteError) as err:
        await request
    assert err.value.reason == "reassembly-full"
    # A refusal naming another peer's request, or nothing we sent, changes nothing.
    b.register_message_handler("echo", lambda peer, body: body)
    a.transport.callbacks.on_refused(b.local_id, Refusal("oversized", "", "no-such-id"))
    assert await a.request(b.local_id, "echo", 2) == 2
    await close_all(a, b)
