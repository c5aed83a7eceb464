"""Per-address quotas of the signaling server, attacked over real sockets.

Attackers connect from their own loopback addresses (127.0.0.2, 127.0.0.3, ...: Linux
routes all of 127/8 to ``lo`` and lets a client socket bind any of them), honest peers
from 127.0.0.1 (the default source) or yet another address. Each test is a finding of
issue 10 (item 7) reproduced: the attack must fail with its reason, be counted globally
and against the attacker's address in ``/stats``, and honest peers must keep joining and
relaying meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from swarm_notebook.errors import SignalingTimeout
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    Join,
    Joined,
    Signal,
    decode_server_message,
    encode,
    join_payload,
    secret_proof,
)
from swarm_notebook.signaling import (
    SignalingClient,
    SignalingConfig,
    SignalingLimits,
    SignalingServer,
)
from swarm_notebook.signaling.quotas import AddressQuotas, QuotaLimits, address_key
from tests.support.signal_cli import cli_signal_server

WAIT = 10.0
HONEST = "127.0.0.1"  # SignalingClient's own source address on loopback
ATTACKER = "127.0.0.2"


class FakeClock:
    """The server's clock for lockouts, advanced by the test instead of slept through."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Bare websockets from one source address; all closed at teardown."""

    def __init__(self, address: str) -> None:
        self.address = address
        # limit=0: a flood needs more than aiohttp's default 100 sockets per session.
        connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
        self.http = aiohttp.ClientSession(connector=connector)
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(url)
        self.sockets.append(ws)
        return ws

    async def join(
        self, url: str, room: str, identity: Identity | None = None, secret: str | None = None
    ) -> tuple[aiohttp.ClientWebSocketResponse, Any]:
        """Connect and join; returns the socket and the server's answer (Joined or Error)."""
        identity = identity or Identity.generate()
        ws = await self.connect(url)
        challenge = await next_message(ws)
        if not isinstance(challenge, Challenge):
            return ws, challenge
        peer_id = identity.peer_id
        signature = identity.sign(join_payload(challenge.nonce, room, peer_id)).hex()
        proof = secret_proof(secret, challenge.nonce, peer_id) if secret else None
        join = Join(room=room, peer_id=peer_id, signature=signature, secret_proof=proof)
        await ws.send_str(encode(join))
        return ws, await next_message(ws)

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        await self.http.close()


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT) -> Any:
    """The next server message, or the string "closed" once the socket is closed."""
    msg = await ws.receive(timeout=timeout)
    if msg.type is aiohttp.WSMsgType.TEXT:
        return decode_server_message(msg.data)
    return "closed"


def reason_of(reply: Any) -> str:
    return reply.reason if isinstance(reply, Error) else type(reply).__name__


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll server-side state that no client can observe (a socket's cleanup)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - no event exists for this, by design
            await asyncio.sleep(0.01)


ServerFactory = Callable[..., Awaitable[SignalingServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    servers: list[SignalingServer] = []

    async def factory(
        *,
        secret: str | None = None,
        clock: Callable[[], float] | None = None,
        per_address: QuotaLimits | None = None,
        **limits: Any,
    ) -> SignalingServer:
        config = SignalingConfig(
            port=0,
            secret=secret,
            limits=SignalingLimits(per_address=per_address or QuotaLimits(), **limits),
        )
        server = SignalingServer(config, **({"clock": clock} if clock else {}))
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def sources() -> AsyncIterator[Callable[[str], Source]]:
    made: list[Source] = []

    def factory(address: str) -> Source:
        made.append(source := Source(address))
        return source

    yield factory
    for source in made:
        await source.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[SignalingClient]]]:
    made: list[SignalingClient] = []

    async def factory(
        url: str, room: str = "lab", *, timeout: float = WAIT, **options: Any
    ) -> SignalingClient:
        client = SignalingClient(
            url, room, Identity.generate(), backoff_initial=0.05, backoff_max=0.3, **options
        )
        made.append(client)
        await client.start(timeout=timeout)
        return client

    yield factory
    for client in made:
        await client.close()


class HonestPair:
    """Two real clients in one room that prove, on demand, that relaying still works."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.a: SignalingClient | None = None
        self.b: SignalingClient | None = None

    async def on_signal(self, peer: str, data: dict[str, Any]) -> None:
        await self.inbox.put((peer, data))

    async def round_trip(self, tag: str) -> None:
        assert self.a is not None and self.b is not None
        await self.a.send_signal(self.b.peer_id, {"tag": tag})
        async with asyncio.timeout(WAIT):
            assert await self.inbox.get() == (self.a.peer_id, {"tag": tag})


async def honest_pair(
    clients: Callable[..., Awaitable[SignalingClient]], url: str, room: str = "lab", **kw: Any
) -> HonestPair:
    pair = HonestPair()
    pair.a = await clients(url, room, **kw)
    pair.b = await clients(url, room, on_signal=pair.on_signal, **kw)
    return pair


def per_address(server: SignalingServer) -> dict[str, Any]:
    stats: dict[str, Any] = server.stats()["per_address"]
    return stats


def offender(server: SignalingServer, address: str) -> dict[str, int]:
    for row in per_address(server)["top_offenders"]:
        if row["address"] == address:
            reasons: dict[str, int] = row["reasons"]
            return reasons
    return {}


# -- the findings --------------------------------------------------------------------------


async def test_key_flood_from_one_address_cannot_fill_a_room_for_an_honest_peer(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    """Finding: 64 throwaway keys filled a room and the next honest peer got room-full."""
    server = await make_server()  # the defaults: 64 peers per room, 32 per address
    limits = SignalingLimits()
    attacker = sources(ATTACKER)
    pair = await honest_pair(clients, server.url)
    answers: Counter[str] = Counter()
    for _ in range(limits.peers_per_room):  # one fresh key per socket, as in the finding
        _, reply = await attacker.join(server.url, "lab")
        answers[reason_of(reply)] += 1
    quota = limits.per_address.peers_per_room_per_address
    assert answers == {"Joined": quota, "too-many-peers-from-address": 64 - quota}

    # The room still has space for honest peers from elsewhere, and they relay.
    third = await clients(server.url, "lab")
    _, reply = await sources("127.0.0.3").join(server.url, "lab")
    assert isinstance(reply, Joined)
    assert third.members >= {pair.a.peer_id, pair.b.peer_id}  # type: ignore[union-attr]
    await pair.round_trip("after-the-key-flood")
    assert server.stats()["peers"] == quota + 4
    assert server.stats()["rejections"] == {"too-many-peers-from-address": 64 - quota}
    assert offender(server, ATTACKER) == {"too-many-peers-from-address": 64 - quota}
    assert offender(server, HONEST) == {}


async def test_socket_flood_is_bounded_per_address_and_honest_peers_keep_relaying(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    """Finding: 999 sockets took every room slot in 0.5 s (and pending ones the server)."""
    server = await make_server()
    pending_quota = QuotaLimits().pending_per_address
    pair = await honest_pair(clients, server.url)
    attacker = sources(ATTACKER)
    flood = 300
    sockets = await asyncio.gather(*(attacker.connect(server.url) for _ in range(flood)))
    replies = await asyncio.gather(*(next_message(ws) for ws in sockets))
    answers = Counter(reason_of(reply) for reply in replies)
    assert answers == {"Challenge": pending_quota, "too-many-pending": flood - pending_quota}
    # Meanwhile: a new honest peer joins, and the honest pair relays.
    late = await clients(server.url, "lab")
    await pair.round_trip("during-the-socket-flood")
    assert pair.a is not None and pair.a.peer_id in late.members

    stats = server.stats()
    assert stats["rejections"] == {"too-many-pending": flood - pending_quota}
    assert offender(server, ATTACKER) == {"too-many-pending": flood - pending_quota}
    assert per_address(server)["top_pending"] == [{"address": ATTACKER, "count": pending_quota}]
    await wait_until(lambda: server.stats()["connections"] == 3 + pending_quota)


async def test_connections_per_address_are_bounded_and_freed_when_a_socket_ends(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    server = await make_server(per_address=QuotaLimits(connections_per_address=6))
    attacker = sources(ATTACKER)
    held = []
    for i in range(6):
        ws, reply = await attacker.join(server.url, f"room-{i % 2}")
        assert isinstance(reply, Joined)
        held.append(ws)
    _, reply = await attacker.join(server.url, "room-0")
    assert reason_of(reply) == "too-many-connections-from-address"
    assert ATTACKER in reply.message
    pair = await honest_pair(clients, server.url, "room-0")  # another address: unaffected
    await pair.round_trip("beside-a-full-address")

    await held[0].close()
    await wait_until(
        lambda: {"address": ATTACKER, "count": 5} in per_address(server)["top_connections"]
    )
    _, reply = await attacker.join(server.url, "room-0")
    assert isinstance(reply, Joined)
    assert server.stats()["rejections"] == {"too-many-connections-from-address": 1}


async def test_never_joined_sockets_are_closed_after_the_deadline_and_free_their_slots(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    """Finding: sockets that never join exhausted max-connections."""
    server = await make_server(join_timeout=1.0, per_address=QuotaLimits(pending_per_address=4))
    attacker = sources(ATTACKER)
    silent = [await attacker.connect(server.url) for _ in range(4)]
    assert [type(await next_message(ws)) for ws in silent] == [Challenge] * 4
    _, reply = await attacker.join(server.url, "lab")
    assert reason_of(reply) == "too-many-pending"
    pair = await honest_pair(clients, server.url)

    for ws in silent:  # each is told why, then closed
        reply = await next_message(ws)
        assert reason_of(reply) == "join-timeout" and "1 s" in reply.message
        assert await next_message(ws) == "closed"
    await wait_until(lambda: per_address(server)["top_pending"] == [])
    _, reply = await attacker.join(server.url, "lab")  # the address may try again
    assert isinstance(reply, Joined)
    await pair.round_trip("after-the-silent-sockets")
    assert server.stats()["rejections"] == {"too-many-pending": 1, "join-timeout": 4}
    assert offender(server, ATTACKER) == {"too-many-pending": 1, "join-timeout": 4}


async def test_rooms_created_per_address_are_bounded_and_freed_when_a_room_empties(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    server = await make_server(per_address=QuotaLimits(rooms_per_address=3))
    attacker = sources(ATTACKER)
    first = None
    for room in ("a", "b", "c"):
        ws, reply = await attacker.join(server.url, room)
        assert isinstance(reply, Joined)
        first = first or ws
    _, reply = await attacker.join(server.url, "d")
    assert reason_of(reply) == "too-many-rooms-from-address"
    # Joining a room that exists is not creating one; other addresses create their own.
    _, reply = await attacker.join(server.url, "a")
    assert isinstance(reply, Joined)
    pair = await honest_pair(clients, server.url, "honest")
    await pair.round_trip("own-room")
    assert {"address": ATTACKER, "count": 3} in per_address(server)["top_rooms_created"]

    assert first is not None
    await first.close()  # room "a" keeps its second member: still counted
    _, reply = await attacker.join(server.url, "d")
    assert reason_of(reply) == "too-many-rooms-from-address"
    await attacker.sockets[-2].close()  # now "a" is empty and gone
    await wait_until(lambda: server.stats()["rooms"] == 3)
    _, reply = await attacker.join(server.url, "d")
    assert isinstance(reply, Joined)
    assert server.stats()["rejections"] == {"too-many-rooms-from-address": 2}


async def test_room_secret_guessing_is_locked_out_with_growing_lockout(
    make_server: ServerFactory, sources: Callable[[str], Source], clients: Any
) -> None:
    """Finding: 401 room-secret guesses in 0.5 s, no lockout."""
    clock = FakeClock()
    quotas = QuotaLimits(secret_failures=5, lockout_base=2.0, lockout_max=60.0)
    server = await make_server(secret="s3cret", clock=clock, per_address=quotas)
    # The guesser shares 127.0.0.1 with a real client below; honest raw peers use .3.
    guesser = sources(HONEST)
    honest = sources("127.0.0.3")

    async def guess(secret: str) -> Any:
        _, reply = await guesser.join(server.url, "lab", secret=secret)
        return reply

    replies = [await guess(f"guess-{i}") for i in range(5)]
    assert [reason_of(r) for r in replies] == ["bad-secret"] * 5
    assert "locked out for 2 s" in replies[-1].message
    # Locked: not even the right secret is checked, and the answer says for how long.
    reply = await guess("s3cret")
    assert reason_of(reply) == "locked-out" and "try again in 2.0 s" in reply.message
    # A real client on the same address hears the same, and is not told to give up.
    with pytest.raises(SignalingTimeout) as timed_out:
        await clients(server.url, "lab", secret="s3cret", timeout=1.0)
    assert "locked-out" in str(timed_out.value) and "try again in" in str(timed_out.value)

    # Another address is unaffected: it joins and relays meanwhile.
    a_ws, a_reply = await honest.join(server.url, "lab", secret="s3cret")
    b_ws, b_reply = await honest.join(server.url, "lab", secret="s3cret")
    assert isinstance(a_reply, Joined) and isinstance(b_reply, Joined)
    await a_ws.send_str(encode(Signal(data={"tag": "locked-beside"}, to=b_reply.peer_id)))
    while not isinstance(msg := await next_message(b_ws), Signal):
        pass
    assert msg.from_ == a_reply.peer_id and msg.data == {"tag": "locked-beside"}

    # The lockout ends, and the next one lasts twice as long.
    clock.now += 2.1
    client = await clients(server.url, "lab", secret="s3cret")
    assert client.connected
    replies = [await guess(f"again-{i}") for i in range(5)]
    assert "locked out for 4 s" in replies[-1].message
    clock.now += 2.1
    assert reason_of(await guess("s3cret")) == "locked-out"  # 4 s, not 2 s

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/stats") as response:
            stats = await response.json()
    table = stats["per_address"]
    assert table["secret_failures_total"] == 10 and table["lockouts_total"] == 2
    assert table["locked_out"] == [{"address": HONEST, "remaining_s": 1.9, "lockouts": 2}]
    assert stats["rejections"]["bad-secret"] == 10
    assert stats["rejections"]["locked-out"] >= 3
    assert offender(server, HONEST)["bad-secret"] == 10
    assert offender(server, "127.0.0.3") == {}


async def test_a_team_on_one_machine_fits_the_default_limits(
    make_server: ServerFactory, clients: Any
) -> None:
    """``up`` with workers and notebooks: every peer from 127.0.0.1, all at once."""
    server = await make_server(secret="team")
    team = 24
    started = await asyncio.gather(
        *(clients(server.url, "lab", secret="team") for _ in range(team))
    )
    others = {c.peer_id for c in started}
    await wait_until(lambda: all(c.members == others - {c.peer_id} for c in started))
    assert server.stats()["rejections"] == {}
    assert all(c.stats()["reconnects"] == 0 for c in started)


async def test_cli_flags_set_the_quotas_of_a_server_in_its_own_process(
    sources: Callable[[str], Source], clients: Any
) -> None:
    """``swarm-notebook signal`` with quota flags, guessed at from another process's view."""
    flags = ("--secret", "s3cret", "--secret-failures", "2", "--lockout", "30")
    async with cli_signal_server(*flags, "--peers-per-room-per-address", "2") as (url, _):
        attacker = sources(ATTACKER)
        guesses = [reason_of((await attacker.join(url, "lab", secret=g))[1]) for g in "abc"]
        assert guesses == ["bad-secret", "bad-secret", "locked-out"]
        joined = [reason_of((await attacker.join(url, "lab", secret="s3cret"))[1])]
        assert joined == ["locked-out"]
        # From 127.0.0.1: two peers fit, the third is over this address's quota.
        pair = await honest_pair(clients, url, secret="s3cret")
        await pair.round_trip("beside-the-locked-address")
        _, reply = await sources(HONEST).join(url, "lab", secret="s3cret")
        assert reason_of(reply) == "too-many-peers-from-address"

        stats_url = url.replace("ws://", "http://").replace("/ws", "/stats")
        async with attacker.http.get(stats_url) as response:
            stats = await response.json()
        table = stats["per_address"]
        assert table["limits"]["secret_failures"] == 2 and table["lockouts_total"] == 1
        assert [row["address"] for row in table["locked_out"]] == [ATTACKER]
        assert 25 < table["locked_out"][0]["remaining_s"] <= 30
        assert stats["rejections"] == {
            "bad-secret": 2,
            "locked-out": 2,
            "too-many-peers-from-address": 1,
        }
        top = {row["address"]: row["reasons"] for row in table["top_offenders"]}
        assert top == {
            ATTACKER: {"bad-secret": 2, "locked-out": 2},
            HONEST: {"too-many-peers-from-address": 1},
        }


@pytest.mark.parametrize(
    "flag", [["--lockout", "0"], ["--pending-per-address", "0"], ["--lockout-max", "1"]]
)
async def test_cli_refuses_a_quota_that_cannot_work(flag: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "swarm_notebook.cli.main",
        "signal",
        "--port",
        "0",
        *flag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await proc.communicate()
    assert proc.returncode == 2 and stderr.decode().startswith("swarm-notebook signal: ")


def test_tables_stay_bounded_under_many_addresses() -> None:
    """A flood from many addresses must not grow the server's per-address memory."""
    now = [0.0]
    quotas = AddressQuotas(
        QuotaLimits(secret_failures=1, tracked_addresses=8), clock=lambda: now[0]
    )
    for i in range(1000):
        address = f"10.0.{i // 256}.{i % 256}"
        quotas.offenders.record(address, "bad-secret")
        assert quotas.secrets.failed(address) == 2.0  # each locks itself out
    assert len(quotas.offenders.top(100)) == 8
    assert quotas.secrets.stats()["locked_out_now"] == 8
    assert quotas.secrets.lockouts_total == 1000
    # A repeat offender outranks one-off addresses and is kept.
    for _ in range(5):
        quotas.offenders.record("10.9.9.9", "malformed")
    assert quotas.offenders.top(1)[0] == {
        "address": "10.9.9.9",
        "refusals": 5,
        "reasons": {"malformed": 5},
    }
    # Addresses that are quiet longer than lockout_max are forgotten.
    now[0] = 10_000.0
    quotas.secrets.failed("10.1.1.1")
    assert quotas.secrets.stats()["locked_out"] == [
        {"address": "10.1.1.1", "remaining_s": 2.0, "lockouts": 1}
    ]


def test_ipv6_clients_share_the_quota_of_their_64() -> None:
    quotas = AddressQuotas(QuotaLimits(connections_per_address=2))
    first, second, third = (address_key(f"2001:db8:0:1::{i}") for i in (1, 2, 3))
    assert first == second == third == "2001:db8:0:1::/64"
    assert quotas.admit(first) is None and quotas.admit(second) is None
    refusal = quotas.admit(third)
    assert refusal is not None and refusal.reason == "too-many-connections-from-address"
    assert quotas.admit(address_key("2001:db8:0:2::1")) is None
    quotas.release(first, joined=False)
    assert quotas.admit(third) is None


async def test_a_tcp_connection_that_never_sends_a_request_is_closed_at_the_join_deadline(
    make_server: ServerFactory, clients: Any
) -> None:
    server = await make_server(join_timeout=0.5)
    silent = [
        await asyncio.open_connection("127.0.0.1", server.port, local_addr=(ATTACKER, 0))
        for _ in range(20)
    ]
    client = await clients(server.url)  # served meanwhile
    for reader, writer in silent:
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # closed by the server, without a word
        writer.close()
    assert client.connected
