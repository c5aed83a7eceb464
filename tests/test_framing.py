"""Chunk framing, reassembly bounds and the envelope decoder under random input."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    encode_envelope_parts,
    envelope_id,
)
from swarm_notebook.protocol.framing import (
    CHUNK,
    Reassembler,
    ReassemblyLimits,
    ReassemblyPool,
    frame_message,
)
from swarm_notebook.reasons import Reason


def test_large_payload_round_trips_in_frames_under_64k() -> None:
    payload = os.urandom(3_000_001)
    frames = list(frame_message(payload, transfer_id=9))
    assert all(len(f) <= 64 * 1024 for f in frames)
    assert len(frames) > 40
    r = Reassembler()
    results = [r.feed(f, now=0.0) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == payload
    assert r.pending_bytes == 0 and r.pending_transfers == 0


def test_interleaved_transfers_reassemble_independently() -> None:
    a, b = os.urandom(200_000), os.urandom(150_000)
    fa, fb = list(frame_message(a, 1)), list(frame_message(b, 2))
    r = Reassembler()
    done = []
    for i in range(max(len(fa), len(fb))):
        for frames in (fa, fb):
            if i < len(frames):
                out = r.feed(frames[i], 0.0)
                if out is not None:
                    done.append(out)
    assert sorted(done, key=len) == [b, a]


def test_oversized_transfer_is_refused_and_memory_released() -> None:
    r = Reassembler(ReassemblyLimits(max_message_bytes=100_000))
    frames = list(frame_message(os.urandom(300_000), 5))
    with pytest.raises(ProtocolError) as err:
        for f in frames:
            r.feed(f, 0.0)
    assert err.value.reason == "oversized"
    assert r.pending_bytes == 0


def test_flood_of_partial_chunks_stays_bounded() -> None:
    limits = ReassemblyLimits(max_pending_bytes=2_000_000, max_transfers=8)
    r = Reassembler(limits)
    reasons: dict[str, int] = {}
    for tid in range(1000):
        first = next(iter(frame_message(os.urandom(500_000), tid)))
        try:
            r.feed(first, 0.0)
        except ProtocolError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
        assert r.pending_bytes <= limits.max_pending_bytes
        assert r.pending_transfers <= limits.max_transfers
    assert reasons.get("too-many-transfers", 0) > 900
    assert len(r.expire(now=limits.timeout_s + 1)) == 8
    assert r.pending_bytes == 0


def test_timeout_counts_from_the_last_progress_not_the_first_chunk() -> None:
    # Issue 11: a 5 MB message over a lossy 100 ms link was dropped after 30 s although
    # chunks were still arriving.
    limits = ReassemblyLimits(timeout_s=30.0)
    r = Reassembler(limits)
    payload = os.urandom(2_000_000)
    frames = list(frame_message(payload, 4))
    out = None
    for i, frame in enumerate(frames):  # one chunk every 20 s: 600+ s in all
        now = 20.0 * i
        assert r.expire(now) == []
        out = r.feed(frame, now)
    assert out == payload
    r.feed(frames[0], 0.0)
    assert r.expire(29.0) == [] and r.expire(31.0) == [4]  # a real stall still expires
    assert r.pending_bytes == 0


def test_rest_of_a_refused_transfer_is_dropped_quietly() -> None:
    r = Reassembler(ReassemblyLimits(max_message_bytes=100_000))
    frames = list(frame_message(os.urandom(300_000), 5))
    reasons = []
    for f in frames:
        try:
            r.feed(f, 0.0)
        except ProtocolError as exc:
            reasons.append(exc.reason)
    assert reasons == ["oversized"]  # one refusal, not one per chunk still arriving
    assert r.discarded_chunks == len(frames) - 1 and r.pending_bytes == 0
    ok = os.urandom(50_000)
    assert [r.feed(f, 0.0) for f in frame_message(ok, 6)][-1] == ok


def test_one_pool_bounds_unfinished_transfers_across_links() -> None:
    limits = ReassemblyLimits(max_pending_bytes=1_000_000, max_total_pending_bytes=1_500_000)
    pool = ReassemblyPool(limits.max_total_pending_bytes)
    links = [Reassembler(limits, pool) for _ in range(10)]
    for n, r in enumerate(links):
        for tid in range(20):
            first = next(iter(frame_message(os.urandom(200_000), n * 100 + tid)))
            try:
                r.feed(first, 0.0)
            except ProtocolError as exc:
                assert exc.reason in {"reassembly-full", "too-many-transfers"}
            assert pool.pending_bytes <= pool.max_bytes
    # Per link alone, the ten links would hold 10 x 1 MB; together they hold 1.5 MB.
    assert pool.pending_bytes == sum(r.pending_bytes for r in links) <= 1_500_000
    assert max(r.pending_bytes for r in links) - min(r.pending_bytes for r in links) < 200_000
    for r in links[:5]:
        r.clear()
    assert pool.pending_bytes == sum(r.pending_bytes for r in links[5:])


def test_a_greedy_link_cannot_starve_an_honest_one() -> None:
    limits = ReassemblyLimits(max_pending_bytes=2_000_000, max_total_pending_bytes=2_000_000)
    pool = ReassemblyPool(limits.max_total_pending_bytes)
    evicted: list[int] = []
    pool.on_evict = lambda r, tid: evicted.append(tid)
    greedy, honest = Reassembler(limits, pool), Reassembler(limits, pool)
    for tid in range(40):  # unfinished transfers until the pool is full
        try:
            greedy.feed(next(iter(frame_message(os.urandom(300_000), tid))), 0.0)
        except ProtocolError:
            pass
    assert pool.pending_bytes > 1_900_000
    message = os.urandom(600_000)
    assert [honest.feed(f, 1.0) for f in frame_message(message, 1)][-1] == message
    assert evicted and pool.pending_bytes == greedy.pending_bytes <= 2_000_000


def test_out_of_order_and_truncated_chunks_are_rejected() -> None:
    r = Reassembler()
    frames = list(frame_message(os.urandom(200_000), 3))
    with pytest.raises(ProtocolError, match="chunk-out-of-order"):
        r.feed(frames[1], 0.0)
    with pytest.raises(ProtocolError, match="truncated-chunk"):
        r.feed(bytes([CHUNK]) + b"\x00" * 5, 0.0)
    with pytest.raises(ProtocolError, match="bad-frame-kind"):
        r.feed(b"\x07abc", 0.0)
    with pytest.raises(ProtocolError, match="empty-frame"):
        r.feed(b"", 0.0)


def test_envelope_decoder_rejects_wrong_version_and_schema() -> None:
    good = Envelope(v=PROTOCOL_VERSION, type="t", id="1", body={"x": b"\x00"})
    assert decode_envelope(encode_envelope(good), max_size=1000) == good
    bad_version = encode_envelope(Envelope(v=99, type="t", id="1"))
    with pytest.raises(ProtocolError, match="bad-version"):
        decode_envelope(bad_version, max_size=1000)
    with pytest.raises(ProtocolError, match="malformed"):
        decode_envelope(b"\x93\x01\x02", max_size=1000)
    with pytest.raises(ProtocolError, match="oversized"):
        decode_envelope(encode_envelope(good), max_size=5)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_decoder_and_reassembler_never_raise_anything_else(data: bytes) -> None:
    r = Reassembler(ReassemblyLimits(max_message_bytes=1 << 20, max_pending_bytes=1 << 21))
    for decode in (lambda: decode_envelope(data, max_size=1 << 20), lambda: r.feed(data, 0.0)):
        try:
            decode()
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 6), st.integers(0, 8), st.binary(max_size=64)),
        max_size=60,
    )
)
def test_mutated_chunk_streams_stay_bounded(chunks: list[tuple[int, int, int, bytes]]) -> None:
    limits = ReassemblyLimits(max_message_bytes=4096, max_pending_bytes=8192, max_transfers=4)
    r = Reassembler(limits)
    for tid, index, count, payload in chunks:
        frame = struct.pack(">BQII", CHUNK, tid, index, count) + payload
        try:
            r.feed(frame, 0.0)
        except ProtocolError:
            pass
        assert r.pending_bytes <= limits.max_pending_bytes
        assert r.pending_transfers <= limits.max_transfers


def test_an_oversized_whole_message_still_names_its_id_for_the_refusal() -> None:
    """A direct link's frames reach 1 MiB: a message refused as too large before it is
    decoded must still be named, or the sender's request waits for its whole timeout."""
    env = Envelope(v=1, type="echo", id="req-7", body={"blob": memoryview(bytes(200_000))})
    whole = b"".join(bytes(part) for part in encode_envelope_parts(env))
    with pytest.raises(ProtocolError) as refused:
        decode_envelope(whole, max_size=100_000)
    assert refused.value.reason == Reason.OVERSIZED
    assert envelope_id(whole) == "req-7"
    assert envelope_id(encode_envelope(env)) == "req-7"
    for garbage in (b"", b"\xc1\x00", os.urandom(64), encode_envelope(env)[:10]):
        assert envelope_id(garbage) is None
