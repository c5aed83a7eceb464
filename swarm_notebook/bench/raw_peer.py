"""Child process of the raw aiortc benchmark: one bare ``RTCPeerConnection`` peer.

Run as ``python -m swarm_notebook.bench.raw_peer offer|answer CONFIG_JSON``. The parent
(:mod:`swarm_notebook.bench.raw_aiortc`) relays SDP between the two children over their
stdin/stdout as JSON lines; there is no signaling server in the transport's ceiling.

* ``answer`` answers every offer, echoes the ``echo`` channel and acknowledges the byte
  total announced on the ``sink`` channel.
* ``offer`` measures: connect time, round trips, bulk throughput, the 50 MB DataFrame
  transfer, and prints each result as a ``metric`` line.

Every aiortc object lives on this process's one event loop; data channel handlers never
raise (a sync exception there would kill the connection) but route failures to the
waiting measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.ice_hosts import host_addresses_from_env, restrict_host_candidates
from swarm_notebook.transport.socket_buffers import widen_ice_sockets

MAX_LINE_BYTES = 1 << 20
# aiortc advertises (and enforces) a 64 KiB SCTP message size.
MAX_MESSAGE_BYTES = 64 << 10
HIGH_WATER_BYTES = 1 << 20
LOW_WATER_BYTES = 256 << 10


@dataclass(frozen=True)
class RawConfig:
    """How much the raw suite measures; ``tiny()``/``quick()``/``full()`` are the presets."""

    connect_samples: int = 12
    rtt_warmup: int = 50
    rtt_samples: int = 2000
    rtt_payload_bytes: int = 32
    bulk_samples: int = 5
    bulk_bytes: int = 32 << 20
    df50_samples: int = 3
    df50_bytes: int = 50_000_000
    chunk_bytes: int = 64 << 10
    step_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        counts = (
            "connect_samples",
            "rtt_samples",
            "bulk_samples",
            "df50_samples",
            "bulk_bytes",
            "df50_bytes",
            "rtt_payload_bytes",
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"bad_config: {name} must be >= 1")
        if self.rtt_warmup < 0:
            raise ValueError("bad_config: rtt_warmup must be >= 0")
        if not 1 <= self.chunk_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"bad_config: chunk_bytes must be 1..{MAX_MESSAGE_BYTES}")
        if not self.step_timeout_s > 0:
            raise ValueError("bad_config: step_timeout_s must be > 0")

    @classmethod
    def full(cls) -> RawConfig:
        return cls()

    @classmethod
    def quick(cls) -> RawConfig:
        return cls(
            connect_samples=5,
            rtt_warmup=20,
            rtt_samples=300,
            bulk_samples=3,
            bulk_bytes=8 << 20,
            df50_samples=2,
        )

    @classmethod
    def tiny(cls) -> RawConfig:
        return cls(
            connect_samples=2,
            rtt_warmup=5,
            rtt_samples=30,
            bulk_samples=2,
            bulk_bytes=2 << 20,
            df50_samples=1,
            df50_bytes=2_000_000,
            step_timeout_s=30.0,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RawConfig:
        return cls(**json.loads(text))


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@contextlib.asynccontextmanager
async def stdin_lines() -> AsyncIterator[asyncio.StreamReader]:
    """The parent's control lines, read without blocking this process's one loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        yield reader
    finally:
        transport.close()


async def read_message(reader: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), timeout)
    if not line:
        raise BenchError(Reason.BENCH_FAILED, "parent closed stdin")
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise BenchError(Reason.BENCH_FAILED, f"malformed control line: {line[:80]!r}")
    return message


def new_peer_connection() -> RTCPeerConnection:
    # An empty server list keeps ICE to host candidates: no public STUN server is contacted.
    restrict_host_candidates(host_addresses_from_env())
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


# ---------------------------------------------------------------------------- answerer


class ByteSink:
    """Counts bytes announced by ``begin:N`` and acknowledges ``ack:N`` once all arrived."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        self._expected: int | None = None
        self._received = 0

    def on_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                kind, _, value = message.partition(":")
                if kind != "begin":
                    self._channel.send(f"error:unexpected control {kind[:20]!r}")
                    return
                self._expected, self._received = int(value), 0
                return
            if self._expected is None:
                self._channel.send("error:data before begin")
                return
            self._received += len(message)
            if self._received == self._expected:
                self._channel.send(f"ack:{self._received}")
                self._expected = None
            elif self._received > self._expected:
                self._channel.send(f"error:overrun {self._received}>{self._expected}")
                self._expected = None
        except Exception as exc:  # never let an exception reach aiortc's dispatch
            print(f"sink failure: {exc!r}", file=sys.stderr)


def serve_channel(channel: RTCDataChannel) -> None:
    if channel.label == "echo":

        @channel.on("message")
        def echo(message: str | bytes) -> None:
            try:
                channel.send(message)
            except Exception as exc:
                print(f"echo failure: {exc!r}", file=sys.stderr)

    elif channel.label == "sink":
        channel.on("message", ByteSink(channel).on_message)


async def run_answerer(config: RawConfig) -> None:
    async with stdin_lines() as reader:
        await answer_offers(reader)


async def answer_offers(reader: asyncio.StreamReader) -> None:
    connections: dict[int, RTCPeerConnection] = {}
    try:
        while True:
            message = await read_message(reader, timeout=600.0)
            kind = message["type"]
            if kind == "quit":
                return
            conn = int(message["conn"])
            if kind == "offer":
                pc = new_peer_connection()
                connections[conn] = pc
                pc.on("datachannel", serve_channel)
                await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                widen_ice_sockets(pc)  # as the swarm's links do: the same OS setting
                emit({"type": "answer", "conn": conn, "sdp": pc.localDescription.sdp})
            elif kind == "close":
                closing = connections.pop(conn, None)
                if closing is not None:
                    await closing.close()
            else:
                raise BenchError(Reason.BENCH_FAILED, f"unknown control type {kind[:20]!r}")
    finally:
        for pc in connections.values():
            await pc.close()


# ---------------------------------------------------------------------------- offerer


class Replies:
    """Hands the next message on a channel to whoever waits for it."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[str | bytes] | None = None
        self.unexpected = 0

    def expect(self) -> asyncio.Future[str | bytes]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def deliver(self, message: str | bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.unexpected += 1
            return
        self._waiter = None
        waiter.set_result(message)


@dataclass
class Link:
    conn: int
    pc: RTCPeerConnection
    echo: RTCDataChannel
    sink: RTCDataChannel
    echo_replies: Replies
    sink_replies: Replies
    buffer_low: asyncio.Event


class Offerer:
    def __init__(self, config: RawConfig, reader: asyncio.StreamReader) -> None:
        self._config = config
        self._reader = reader
        self._next_conn = 0

    async def connect(self) -> tuple[Link, float]:
        """Open a fresh connection; returns it and ms from createOffer to both channels open."""
        timeout = self._config.step_timeout_s
        conn = self._next_conn
        self._next_conn += 1
        pc = new_peer_connection()
        echo = pc.createDataChannel("echo")
        sink = pc.createDataChannel("sink")
        link = Link(conn, pc, echo, sink, Replies(), Replies(), asyncio.Event())
        echo.on("message", link.echo_replies.deliver)
        sink.on("message", link.sink_replies.deliver)
        sink.bufferedAmountLowThreshold = LOW_WATER_BYTES
        sink.on("bufferedamountlow", link.buffer_low.set)
        opened = [asyncio.Event(), asyncio.Event()]
        echo.on("open", opened[0].set)
        sink.on("open", opened[1].set)

        try:
            started = time.perf_counter()
            await pc.setLocalDescription(await pc.createOffer())
            widen_ice_sockets(pc)
            emit({"type": "offer", "conn": conn, "sdp": pc.localDescription.sdp})
            answer = await read_message(self._reader, timeout)
            if answer["type"] != "answer" or answer.get("conn") != conn:
                raise BenchError(
                    Reason.BENCH_FAILED, f"expected answer for {conn}, got {answer['type']!r}"
                )
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), timeout)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
        except BaseException:
            await pc.close()
            raise
        return link, elapsed_ms

    async def close(self, link: Link) -> None:
        await link.pc.close()
        emit({"type": "close", "conn": link.conn})

    async def round_trip_ms(self, link: Link, payload: bytes) -> float:
        reply = link.echo_replies.expect()
        started = time.perf_counter()
        link.echo.send(payload)
        echoed = await asyncio.wait_for(reply, self._config.step_timeout_s)
        elapsed = (time.perf_counter() - started) * 1000.0
        if echoed != payload:
            raise BenchError(Reason.BENCH_FAILED, "echo returned different bytes")
        return elapsed

    async def push_and_ack_s(self, link: Link, chunks: Iterator[bytes], total: int) -> float:
        """Send ``total`` bytes with back-pressure; seconds until the receiver acks them."""
        ack = link.sink_replies.expect()
        started = time.perf_counter()
        link.sink.send(f"begin:{total}")
        for chunk in chunks:
            if link.sink.bufferedAmount > HIGH_WATER_BYTES:
                # Cleared and awaited with no await in between: the low event cannot slip.
                link.buffer_low.clear()
                await asyncio.wait_for(link.buffer_low.wait(), self._config.step_timeout_s)
            link.sink.send(chunk)
        reply = await asyncio.wait_for(ack, self._config.step_timeout_s)
        elapsed = time.perf_counter() - started
        if reply != f"ack:{total}":
            raise BenchError(Reason.BENCH_FAILED, f"receiver answered {reply!r:.80}")
        return elapsed


def chunked(payload: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(payload), size):
        yield payload[offset : offset + size]


def repeated_chunks(total: int, size: int) -> Iterator[bytes]:
    block = bytes(size)
    full, rest = divmod(total, size)
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


def arrow_ipc_dataframe(target_bytes: int) -> bytes:
    """A numeric DataFrame of about ``target_bytes`` serialised as an Arrow IPC stream."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    columns = 5
    rows = max(1, target_bytes // (8 * columns))
    values = np.random.default_rng(0).random((rows, columns))
    frame = pd.DataFrame(values, columns=[f"c{i}" for i in range(columns)])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def progress(phase: str, done: int, total: int) -> None:
    emit({"type": "progress", "phase": phase, "done": done, "total": total})


def metric(name: str, samples: list[float], unit: str) -> None:
    emit({"type": "metric", "name": name, "samples": samples, "unit": unit})


async def run_offerer(config: RawConfig) -> None:
    async with stdin_lines() as reader:
        await measure(Offerer(config, reader), config)


class MeasuredOfferer(Protocol):
    """What :func:`measure` drives (this module's ``Offerer``, or another backend's)."""

    async def connect(self) -> tuple[Any, float]: ...
    async def close(self, link: Any) -> None: ...
    async def round_trip_ms(self, link: Any, payload: bytes) -> float: ...
    async def push_and_ack_s(self, link: Any, chunks: Iterator[bytes], total: int) -> float: ...


async def measure(offerer: MeasuredOfferer, config: RawConfig) -> None:
    # A first connection warms imports and code paths; it is not a sample.
    warm, _ = await offerer.connect()
    await offerer.close(warm)
    connect_ms: list[float] = []
    link: Any = None
    for i in range(config.connect_samples):
        link, elapsed = await offerer.connect()
        connect_ms.append(elapsed)
        progress("connect", i + 1, config.connect_samples)
        if i + 1 < config.connect_samples:
            await offerer.close(link)
    if link is None:
        raise BenchError(Reason.BENCH_FAILED, "connect_samples must be >= 1")
    metric("raw_connect_ms", connect_ms, "ms")
    try:
        payload = b"p" * config.rtt_payload_bytes
        for _ in range(config.rtt_warmup):
            await offerer.round_trip_ms(link, payload)
        rtt_ms: list[float] = []
        step = max(1, config.rtt_samples // 20)
        for i in range(config.rtt_samples):
            rtt_ms.append(await offerer.round_trip_ms(link, payload))
            if (i + 1) % step == 0 or i + 1 == config.rtt_samples:
                progress("rtt", i + 1, config.rtt_samples)
        metric("raw_rtt_ms", rtt_ms, "ms")

        bulk_mbps: list[float] = []
        for i in range(config.bulk_samples):
            chunks = repeated_chunks(config.bulk_bytes, config.chunk_bytes)
            seconds = await offerer.push_and_ack_s(link, chunks, config.bulk_bytes)
            bulk_mbps.append(config.bulk_bytes / seconds / 1e6)
            progress("bulk", i + 1, config.bulk_samples)
        metric("raw_bulk_MBps", bulk_mbps, "MB/s")

        frame_bytes = arrow_ipc_dataframe(config.df50_bytes)
        df50_s: list[float] = []
        for i in range(config.df50_samples):
            chunks = chunked(frame_bytes, config.chunk_bytes)
            df50_s.append(await offerer.push_and_ack_s(link, chunks, len(frame_bytes)))
            progress("df50", i + 1, config.df50_samples)
        metric("df50_raw_s", df50_s, "s")
    finally:
        await offerer.close(link)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("offer", "answer"):
        print(
            "usage: python -m swarm_notebook.bench.raw_peer offer|answer CONFIG_JSON",
            file=sys.stderr,
        )
        return 2
    role = run_offerer if argv[0] == "offer" else run_answerer
    try:
        config = RawConfig.from_json(argv[1])
        asyncio.run(role(config))
    except Exception as exc:
        emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    emit({"type": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
