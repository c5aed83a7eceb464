"""Fuzzing: mutated *valid* frames against the envelope decoder, the chunk reassembler and
the signaling server (over a real websocket), and a flood of partial chunks over a live
aiortc data channel against a peer in its own process.

``tests/test_framing.py`` and ``tests/test_signaling.py`` already feed random bytes and
random JSON; here every input starts as something the real encoder produced and is then
broken the ways a faulty or hostile peer would break it (bit flips, truncation, changed
length fields, reordering, duplication).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_notebook.errors import ProtocolError, RemoteError
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.envelope import (
    MAX_ID_LENGTH,
    MAX_TYPE_LENGTH,
    PROTOCOL_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
)
from swarm_notebook.protocol.framing import (
    CHUNK,
    CHUNK_HEADER_SIZE,
    WHOLE,
    Reassembler,
    ReassemblyLimits,
    frame_message,
)
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    Join,
    Joined,
    PeerJoined,
    PeerLeft,
    Signal,
    decode_client_message,
    decode_server_message,
    encode,
    join_payload,
)
from swarm_notebook.reasons import Reason
from swarm_notebook.signaling import SignalingConfig, SignalingServer
from swarm_notebook.transport.endpoint import Endpoint
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport
from swarm_notebook.transport.mesh import MeshTransport
from tests.chaos.helpers import wait_until
from tests.support.procs import PeerProcess, child_processes
from tests.support.threaded_server import ThreadedServer

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

FUZZ = settings(
    max_examples=int(os.environ.get("SWARM_CHAOS_EXAMPLES", "1000")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- mutations of real encoded bytes -------------------------------------------------------

plain = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
bodies = st.recursive(
    plain | st.binary(max_size=300),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
envelopes = st.builds(
    Envelope,
    v=st.just(PROTOCOL_VERSION),
    type=st.text(min_size=1, max_size=MAX_TYPE_LENGTH),
    id=st.text(min_size=1, max_size=MAX_ID_LENGTH),
    reply_to=st.none() | st.text(min_size=1, max_size=MAX_ID_LENGTH),
    body=bodies,
    ask=st.booleans(),
)


MutationStep = tuple[str, int, int, bytes]
KINDS = ("flip", "truncate", "extend", "byte", "splice", "cut")
NASTY_BYTES = (0x00, 0x7F, 0x80, 0xC1, 0xDB, 0xDD, 0xDF, 0xFF)

# One to three ways of breaking bytes (or none, as a control); positions are taken modulo
# the length, so a plan can be drawn before the bytes it breaks exist (a signed join
# needs the server's challenge first).
mutation_plans = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 2**16),
        st.integers(0, 2**16),
        st.binary(min_size=1, max_size=40),
    ),
    max_size=3,
)


def apply_mutations(plan: list[MutationStep], data: bytes) -> bytes:
    out = bytearray(data)
    for kind, a, b, extra in plan:
        if kind == "extend":
            out += extra
        elif not out:
            continue
        elif kind == "flip":
            out[a % len(out)] ^= 1 << (b % 8)
        elif kind == "truncate":
            del out[a % len(out) :]
        elif kind == "byte":
            out[a % len(out)] = NASTY_BYTES[b % len(NASTY_BYTES)]
        elif kind == "splice":
            i = a % (len(out) + 1)
            out[i:i] = extra[: 1 + b % 16]
        elif kind == "cut" and len(out) > 1:
            i = a % (len(out) - 1)
            del out[i : i + 1 + b % (len(out) - i)]
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    return apply_mutations(draw(mutation_plans), data)


def check_decoded(env: Envelope) -> None:
    """Whatever the decoder lets through obeys the protocol's own rules."""
    assert env.v == PROTOCOL_VERSION
    assert isinstance(env.type, str) and 1 <= len(env.type) <= MAX_TYPE_LENGTH
    assert isinstance(env.id, str) and 1 <= len(env.id) <= MAX_ID_LENGTH
    assert env.reply_to is None or len(env.reply_to) <= MAX_ID_LENGTH
    assert isinstance(env.ask, bool)


@FUZZ
@given(st.data(), envelopes)
def test_mutated_envelopes_decode_or_fail_with_a_reason(data: st.DataObject, env: Envelope) -> None:
    encoded = encode_envelope(env)
    assert decode_envelope(encoded, max_size=1 << 20) == env
    broken = data.draw(mutated(encoded))
    try:
        check_decoded(decode_envelope(broken, max_size=1 << 20))
    except ProtocolError as exc:
        assert exc.reason in {"malformed", "bad-version", "bad-type", "bad-id", "oversized"}


def test_decoder_reports_bad_utf8_and_deep_nesting_as_malformed() -> None:
    """Found by the fuzz above: msgspec raises UnicodeDecodeError / RecursionError itself,
    which escaped the decoder (a peer could make the mesh log a traceback per frame)."""
    header = b"\x96\x01\xa1t\xa11\xc0"
    for data in (b"\x96\x01\xa1\xb0\xa10\xc0\xc0\xc2", header + b"\x91" * 100_000 + b"\xc0\xc2"):
        with pytest.raises(ProtocolError) as err:
            decode_envelope(data, max_size=1 << 20)
        assert err.value.reason == "malformed"


async def test_a_reply_that_cannot_be_encoded_is_answered_with_a_reason() -> None:
    """Found by the fuzz above: an int beyond msgpack's range raised OverflowError in the
    reply path, so the asker heard nothing and waited for its timeout."""
    net = MemoryNetwork()
    a, b = Identity.generate(), Identity.generate()
    ends = [Endpoint(MemoryTransport(who, net, "r")) for who in (a, b)]
    ends[1].register_message_handler("big", lambda peer, body: 2**70)
    for end in ends:
        await end.transport.start()
    try:
        with pytest.raises(RemoteError) as err:
            await ends[0].request(b.peer_id, "big", None, timeout=5)
        assert err.value.reason == "bad-reply"
    finally:
        for end in ends:
            await end.close()
            await end.transport.close()


LIMITS = ReassemblyLimits(
    max_message_bytes=16 * 1024, max_pending_bytes=24 * 1024, max_transfers=4, timeout_s=5.0
)


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], bool]:
    """Frames of several real transfers, interleaved, then broken; and whether intact."""
    payloads = draw(st.lists(st.binary(min_size=1, max_size=6000), min_size=1, max_size=4))
    frame_size = draw(st.integers(CHUNK_HEADER_SIZE + 1, 2048))
    streams = [
        list(frame_message(p, transfer_id=draw(st.integers(0, 3)) * 100 + i, frame_size=frame_size))
        for i, p in enumerate(payloads)
    ]
    frames: list[bytes] = []
    while any(streams):
        stream = draw(st.sampled_from([s for s in streams if s]))
        frames.append(stream.pop(0))
    intact = list(frames)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        kind = draw(st.sampled_from(["bytes", "header", "drop", "dup", "swap", "stale"]))
        if kind == "bytes":
            frames[i] = draw(mutated(frames[i]))
        elif kind == "header" and len(frames[i]) > CHUNK_HEADER_SIZE and frames[i][0] == CHUNK:
            # Rewrite the length fields a sender controls: index and count (the length is
            # checked first: a byte mutation may have emptied the frame).
            _, tid, index, count = struct.unpack_from(">BQII", frames[i])
            index = draw(st.sampled_from([index, index + 1, 0, 2**32 - 1]))
            count = draw(st.sampled_from([count, count - 1, count + 1, 1, 0, 2**32 - 1]))
            frames[i] = struct.pack(">BQII", CHUNK, tid, index, count % 2**32) + frames[i][17:]
        elif kind == "drop":
            del frames[i]
        elif kind == "dup":
            frames.insert(i, frames[i])
        elif kind == "swap" and i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
        elif kind == "stale":
            frames.insert(i, bytes([draw(st.sampled_from([WHOLE, CHUNK, 0x02, 0xFF]))]))
        if not frames:
            break
    return frames, [p for p in payloads], frames == intact


@FUZZ
@given(mutated_streams())
def test_mutated_chunk_streams_never_escape_and_stay_bounded(
    case: tuple[list[bytes], list[bytes], bool],
) -> None:
    frames, payloads, intact = case
    r = Reassembler(LIMITS)
    delivered: list[bytes] = []
    for frame in frames:
        try:
            out = r.feed(frame, now=0.0)
        except ProtocolError as exc:
            assert exc.reason and exc.reason == exc.reason.strip()
            out = None
        if out is not None:
            delivered.append(out)
            assert len(out) <= LIMITS.max_message_bytes
        assert r.pending_bytes <= LIMITS.max_pending_bytes
        assert r.pending_transfers <= LIMITS.max_transfers
        assert r.pending_bytes == sum(t.size for t in r._transfers.values())
    if intact and all(len(p) <= LIMITS.max_message_bytes for p in payloads):
        # Untouched streams come out whole (within the limits), each exactly once.
        if sum(len(p) for p in payloads) <= LIMITS.max_pending_bytes:
            assert sorted(delivered) == sorted(payloads)
    # Whatever was left half-way is released by the timeout, to the byte.
    r.expire(now=LIMITS.timeout_s + 1)
    assert r.pending_bytes == 0 and r.pending_transfers == 0


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 3000), st.integers(2, 50)),
        min_size=1,
        max_size=300,
    )
)
def test_flood_of_partial_chunks_keeps_pending_under_the_limit(
    plan: list[tuple[int, int, int]],
) -> None:
    """Transfers that start, grow and never finish: memory stays under the limit."""
    r = Reassembler(LIMITS)
    next_index: dict[int, int] = {}
    refused = 0
    for tid, size, count in plan:
        index = next_index.get(tid, 0)
        frame = struct.pack(">BQII", CHUNK, tid, index, count) + b"x" * size
        try:
            r.feed(frame, now=0.0)
            next_index[tid] = index + 1
        except ProtocolError:
            refused += 1
            next_index.pop(tid, None)
        assert r.pending_bytes <= LIMITS.max_pending_bytes
        assert r.pending_transfers <= LIMITS.max_transfers
    r.expire(now=LIMITS.timeout_s + 1)
    assert r.pending_bytes == 0


# -- the signaling server's handler over a real websocket ----------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records (a handler bug is logged with a traceback, not raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed_server() -> Iterator[tuple[ThreadedServer, ErrorLog]]:
    errors = ErrorLog()
    logger = logging.getLogger("swarm_notebook.signaling")
    logger.addHandler(errors)
    server = ThreadedServer()
    yield server, errors
    server.stop()
    logger.removeHandler(errors)


IDENTITY = Identity.generate()
OTHER = Identity.generate()


def valid_frames(nonce: str, room: str) -> list[bytes]:
    """A real join for this socket's challenge, then real signals to a room member."""
    signature = IDENTITY.sign(join_payload(nonce, room, IDENTITY.peer_id)).hex()
    join = encode(Join(room=room, peer_id=IDENTITY.peer_id, signature=signature))
    offer = {"kind": "offer", "session": "s" * 32, "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
    candidate = {"kind": "candidate", "session": "s" * 32, "candidate": {"candidate": ""}}
    return [
        join.encode(),
        encode(Signal(data=offer, to=OTHER.peer_id)).encode(),
        encode(Signal(data=candidate, to=OTHER.peer_id)).encode(),
    ]


async def next_reply(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> Any:
    msg = await ws.receive(timeout=timeout)
    if msg.type is aiohttp.WSMsgType.TEXT:
        return decode_server_message(msg.data)
    return "closed"


async def next_signal(ws: aiohttp.ClientWebSocketResponse) -> Any:
    """The next relayed signal, past membership notices."""
    while isinstance(reply := await next_reply(ws), (PeerJoined, PeerLeft)):
        pass
    return reply


async def member_of(server: ThreadedServer, room: str) -> aiohttp.ClientWebSocketResponse:
    ws = await server.http.ws_connect(server.server.url)
    challenge = await next_reply(ws)
    assert isinstance(challenge, Challenge)
    signature = OTHER.sign(join_payload(challenge.nonce, room, OTHER.peer_id)).hex()
    await ws.send_str(encode(Join(room=room, peer_id=OTHER.peer_id, signature=signature)))
    assert isinstance(await next_reply(ws), Joined)
    return ws


# Refusals after which the server closes the socket (the others keep it open).
# The reasons the server closes a socket for (after saying so): a frame it cannot read, a
# room name it refuses, a join that does not prove its key or spells its id wrongly.
CLOSING_REASONS = frozenset(
    {Reason.MALFORMED, Reason.TOO_LARGE, Reason.BAD_ROOM, Reason.BAD_SIGNATURE, Reason.BAD_ID}
)


def forwarded_as_is(sent: bytes) -> bool:
    """Whether the server should relay this frame to the member rather than answer it."""
    try:
        message = decode_client_message(sent)
    except msgspec.DecodeError:
        return False
    return (
        isinstance(message, Signal)
        and message.to == OTHER.peer_id
        and len(sent) <= SignalingConfig().limits.max_frame_bytes
    )


async def send_mutated(
    server: ThreadedServer, room: str, mutate: Any, binary: list[bool]
) -> list[Any]:
    """Join (mutated) and signal (mutated) on one socket: each frame is either answered
    or, when it is still a valid signal, relayed to the member with our stamped id."""
    member = await member_of(server, room)
    ws = await server.http.ws_connect(server.server.url)
    replies: list[Any] = []
    joined = False
    try:
        challenge = await next_reply(ws)
        assert isinstance(challenge, Challenge)
        for frame, as_binary in zip(valid_frames(challenge.nonce, room), binary, strict=True):
            broken = mutate(frame)
            if as_binary:
                await ws.send_bytes(broken)
                sent = broken
            else:
                text = broken.decode("utf-8", errors="replace")
                await ws.send_str(text)
                sent = text.encode("utf-8")
            if joined and not as_binary and forwarded_as_is(sent):
                replies.append(("forwarded", await next_signal(member)))
                continue
            reply = await next_reply(ws)
            replies.append(reply)
            if reply == "closed":
                break
            if isinstance(reply, Error) and reply.reason in CLOSING_REASONS:
                replies.append(await next_reply(ws))  # the reason comes first, then the close
                break
            joined = joined or isinstance(reply, Joined)
    finally:
        await ws.close()
        await member.close()
    return replies


@FUZZ
@given(
    st.lists(mutation_plans, min_size=3, max_size=3),
    st.lists(st.integers(0, 9), min_size=3, max_size=3),
)
def test_mutated_join_and_signal_frames_are_answered_and_never_escape(
    fuzzed_server: tuple[ThreadedServer, ErrorLog],
    plans: list[list[MutationStep]],
    kinds: list[int],
) -> None:
    server, errors = fuzzed_server
    binary = [k == 0 for k in kinds]  # mostly text frames, now and then a binary one
    plans_left = list(plans)

    def mutate(frame: bytes) -> bytes:
        return apply_mutations(plans_left.pop(0), frame)

    replies = server.call(send_mutated(server, "fuzz", mutate, binary))
    assert replies, "the server answered nothing"
    for reply in replies:
        if isinstance(reply, tuple):
            assert isinstance(reply[1], Signal) and reply[1].from_ == IDENTITY.peer_id
            continue
        # Every broken frame gets a reason; nothing else comes back.
        assert isinstance(reply, (Error, Joined)) or reply == "closed", reply
        if isinstance(reply, Error):
            assert reply.reason and reply.message
    last = replies[-1]
    if last == "closed":
        # The server closes a socket only after telling it why.
        assert isinstance(replies[-2], Error) and replies[-2].reason in CLOSING_REASONS
    assert errors.records == [], [r.getMessage() for r in errors.records]


def test_deeply_nested_signal_gets_a_reason_not_a_handler_crash(
    fuzzed_server: tuple[ThreadedServer, ErrorLog],
) -> None:
    """Found by this suite: nesting beyond the interpreter's limit raised RecursionError in
    the server's handler, which closed the socket with no reason and logged a traceback."""
    server, errors = fuzzed_server
    deep = '{"type":"signal","to":"x","data":{"a":' + "[" * 30_000 + "]" * 30_000 + "}}"

    async def send() -> Any:
        ws = await server.http.ws_connect(server.server.url)
        try:
            assert isinstance(await next_reply(ws), Challenge)
            await ws.send_str(deep)
            return await next_reply(ws)
        finally:
            await ws.close()

    reply = server.call(send())
    assert isinstance(reply, Error) and reply.reason == "malformed", reply
    assert errors.records == []


def test_signaling_server_serves_cleanly_after_the_fuzz(
    fuzzed_server: tuple[ThreadedServer, ErrorLog],
) -> None:
    server, errors = fuzzed_server

    async def look() -> tuple[list[Any], dict[str, Any]]:
        replies = await send_mutated(server, "after", lambda f: f, [False, False, False])
        await wait_until(lambda: server.server.stats()["connections"] == 0, 10, "sockets closed")
        return replies, server.server.stats()

    replies, stats = server.call(look())
    assert isinstance(replies[0], Joined)
    assert [r[0] for r in replies[1:]] == ["forwarded", "forwarded"]
    assert stats["peers"] == 0 and stats["rooms"] == 0
    assert sum(stats["rejections"].values()) > 0
    assert errors.records == []
    print(
        f"\n[chaos] signaling fuzz: {stats['connections_total']} sockets, "
        f"{stats['messages_received']} frames, rejections {stats['rejections']}; "
        "no handler errors, server still joins and forwards"
    )


# -- a flood of partial chunks over a live data channel ------------------------------------

MAX_PENDING_MB = 8
MAX_TRANSFERS = 16
MAX_MESSAGE_MB = 4
FLOOD_MB = 160
# RSS the receiver may gain: the reassembly limit plus slack for aiortc's receive
# buffers and allocator noise. Without the limit a flood keeps every byte it sends.
RSS_SLACK_MB = 48


async def flood_partial_chunks(transport: MeshTransport, peer: str, total: int) -> int:
    """Send chunks of transfers that never complete, respecting back-pressure."""
    link = transport._links[peer]
    channel = link.channel
    assert channel is not None
    drained = asyncio.Event()
    mesh_low = channel.events.on_buffered_low  # keep the mesh's own back-pressure wake-up

    def low() -> None:
        mesh_low()
        drained.set()

    channel.events.on_buffered_low = low
    piece = 64 * 1024 - CHUNK_HEADER_SIZE
    count = 60  # 60 x 64 KiB announced: under 2 x the 4 MiB message limit, so it starts
    body = os.urandom(piece)
    sent = 0
    tid = 1_000_000
    while sent < total:
        transfers = range(tid, tid + MAX_TRANSFERS * 2)
        tid += MAX_TRANSFERS * 2
        for index in range(count - 1):  # never the last chunk
            for transfer in transfers:
                if channel.buffered_amount > 1 << 20:
                    drained.clear()
                    await asyncio.wait_for(drained.wait(), 30)
                channel.send(struct.pack(">BQII", CHUNK, transfer, index, count) + body)
                sent += piece + CHUNK_HEADER_SIZE
                if sent >= total:
                    return sent
    return sent


async def test_flood_of_partial_chunks_over_a_live_link_keeps_receiver_memory_bounded(
    server: SignalingServer, tmp_path: Path
) -> None:
    receiver = await PeerProcess.start(
        os.path.join("..", "chaos", "flood_receiver.py"),
        "--signaling",
        server.url,
        "--room",
        "flood",
        "--profile",
        str(tmp_path / "receiver"),
        "--max-pending-mb",
        str(MAX_PENDING_MB),
        "--max-transfers",
        str(MAX_TRANSFERS),
        "--max-message-mb",
        str(MAX_MESSAGE_MB),
        name="receiver",
    )
    transport = mesh_transport(Identity.generate(), server.url, "flood")
    endpoint = Endpoint(transport)
    try:
        ready = await receiver.wait_for(lambda e: e.get("event") == "ready", 30)
        peer = ready["peer_id"]
        await transport.start()
        await wait_until(lambda: peer in transport.connected_peers(), 30, "the link")
        # Warm up both ends so the baseline includes a working link's steady state.
        for _ in range(20):
            assert await endpoint.request(peer, "echo", os.urandom(200_000)) is not None
        process = psutil.Process(receiver.proc.pid)
        before = process.memory_info().rss
        peak = before
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.05)  # a sampling rate, not synchronisation

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        sent = await flood_partial_chunks(transport, peer, FLOOD_MB * 2**20)
        # The channel is ordered: once this answer is back, every flood frame was handled.
        assert await endpoint.request(peer, "echo", b"after", timeout=60) == b"after"
        seconds = time.monotonic() - started
        sampling = False
        await sampler
        after = process.memory_info().rss
        state = await receiver.call("state")
        grown_mb = (max(peak, after) - before) / 2**20
        assert state["bytes_in"] >= sent
        assert state["pending_bytes"] <= MAX_PENDING_MB * 2**20
        assert state["pending_transfers"] <= MAX_TRANSFERS
        assert transport.local_id in state["connected"], "the flood must not cost the link"
        refused = state["rejections"]
        assert refused.get("reassembly-full", 0) + refused.get("too-many-transfers", 0) > 0
        assert grown_mb < MAX_PENDING_MB + RSS_SLACK_MB, (grown_mb, state)
        print(
            f"\n[chaos] partial-chunk flood: {sent / 2**20:.0f} MiB in {seconds:.1f} s over a "
            f"live link; receiver RSS {before / 2**20:.0f} -> peak {peak / 2**20:.0f} -> "
            f"{after / 2**20:.0f} MiB (+{grown_mb:.1f} MiB, limit {MAX_PENDING_MB} MiB pending "
            f"+ {RSS_SLACK_MB} MiB slack); pending now {state['pending_bytes'] / 2**20:.1f} MiB "
            f"in {state['pending_transfers']} transfers; refused {refused}"
        )
    finally:
        await endpoint.close()
        await transport.close()
        assert await receiver.stop() == 0, "".join(receiver.stderr_lines[-20:])
    assert receiver.problems() == []
    assert child_processes() == []
