"""Child process of the raw suite for a non-aiortc backend: one bare peer over
``transport.backends`` (e.g. libdatachannel), no mesh, framing or authentication on top.

Run as ``python -m swarm_notebook.bench.raw_backend_peer offer|answer CONFIG_JSON`` with
``$SWARM_NOTEBOOK_TRANSPORT_BACKEND`` naming the backend. It speaks the same JSON lines
as :mod:`swarm_notebook.bench.raw_peer` and reuses its measurements, so the raw metrics
mean the same for every backend: the ceiling of the library as this process's asyncio
loop sees it (for ``native``, that includes the hop from libdatachannel's threads).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from swarm_notebook.bench.raw_peer import (
    HIGH_WATER_BYTES,
    LOW_WATER_BYTES,
    RawConfig,
    Replies,
    emit,
    measure,
    read_message,
    stdin_lines,
)
from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason
from swarm_notebook.transport.backends.base import BackendConfig, DataChannel, PeerBackend
from swarm_notebook.transport.backends.select import backend_factory, backend_name, prepare
from swarm_notebook.transport.ice_hosts import host_addresses_from_env

# Backends whose link carries one channel (the mesh never opens more): the raw peers
# multiplex the echo and the sink on it.
SINGLE_CHANNEL_BACKENDS = ("direct",)


def new_backend() -> PeerBackend:
    name = backend_name()
    hosts = host_addresses_from_env()
    prepare(name, hosts)
    return backend_factory(name)(BackendConfig(host_addresses=hosts))


class Sink:
    """Counts bytes announced by ``begin:N`` and acknowledges ``ack:N`` once all arrived."""

    def __init__(self, channel: DataChannel) -> None:
        self._channel = channel
        self._expected: int | None = None
        self._received = 0

    @property
    def expecting(self) -> bool:
        return self._expected is not None

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            kind, _, value = message.partition(":")
            if kind == "begin":
                self._expected, self._received = int(value), 0
            return
        if self._expected is None:
            self._channel.send("error:data before begin")
            return
        self._received += len(message)
        if self._received >= self._expected:
            self._channel.send(f"ack:{self._received}")
            self._expected = None


class EchoOrSink:
    """One channel doing both jobs, for a backend whose link carries a single channel
    (``direct``): bytes announced by ``begin:N`` are counted, any other bytes echoed."""

    def __init__(self, channel: DataChannel) -> None:
        self._channel = channel
        self._sink = Sink(channel)

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str) or self._sink.expecting:
            self._sink.on_message(message)
        else:
            self._channel.send(message)


def serve_channel(channel: DataChannel) -> None:
    if channel.label == "echo":
        channel.events.on_message = channel.send
    elif channel.label == "sink":
        channel.events.on_message = Sink(channel).on_message
    else:
        channel.events.on_message = EchoOrSink(channel).on_message


async def answer_offers() -> None:
    connections: dict[int, PeerBackend] = {}
    async with stdin_lines() as reader:
        try:
            while True:
                message = await read_message(reader, timeout=600.0)
                kind = message["type"]
                if kind == "quit":
                    return
                conn = int(message["conn"])
                if kind == "offer":
                    pc = new_backend()
                    connections[conn] = pc
                    pc.on_channel = serve_channel
                    await pc.set_remote_description(message["sdp"], "offer")
                    emit({"type": "answer", "conn": conn, "sdp": await pc.create_answer()})
                elif kind == "close":
                    closing = connections.pop(conn, None)
                    if closing is not None:
                        await closing.close()
                else:
                    raise BenchError(Reason.BENCH_FAILED, f"unknown control type {kind[:20]!r}")
        finally:
            for pc in connections.values():
                await pc.close()


@dataclass
class Link:
    conn: int
    pc: PeerBackend
    echo: DataChannel
    sink: DataChannel
    echo_replies: Replies
    sink_replies: Replies
    buffer_low: asyncio.Event

    def deliver_either(self, message: str | bytes) -> None:
        """One channel for both: echoes come back as bytes, acknowledgements as text."""
        (self.sink_replies if isinstance(message, str) else self.echo_replies).deliver(message)


class Offerer:
    """The measurements :func:`raw_peer.measure` drives, over a backend."""

    def __init__(self, config: RawConfig, reader: asyncio.StreamReader) -> None:
        self._config = config
        self._reader = reader
        self._next_conn = 0

    async def connect(self) -> tuple[Link, float]:
        timeout = self._config.step_timeout_s
        conn = self._next_conn
        self._next_conn += 1
        pc = new_backend()
        if pc.name in SINGLE_CHANNEL_BACKENDS:
            echo = sink = pc.create_channel("raw")
        else:
            echo, sink = pc.create_channel("echo"), pc.create_channel("sink")
        link = Link(conn, pc, echo, sink, Replies(), Replies(), asyncio.Event())
        channels = [echo] if echo is sink else [echo, sink]
        opened = [asyncio.Event() for _ in channels]
        for channel, event in zip(channels, opened, strict=True):
            channel.events.on_open = event.set
        echo.events.on_message = link.deliver_either if echo is sink else link.echo_replies.deliver
        if echo is not sink:
            sink.events.on_message = link.sink_replies.deliver
        sink.set_buffered_amount_low_threshold(LOW_WATER_BYTES)
        sink.events.on_buffered_low = link.buffer_low.set
        try:
            started = time.perf_counter()
            emit({"type": "offer", "conn": conn, "sdp": await pc.create_offer()})
            answer = await read_message(self._reader, timeout)
            if answer["type"] != "answer" or answer.get("conn") != conn:
                raise BenchError(
                    Reason.BENCH_FAILED, f"expected answer for {conn}, got {answer['type']!r}"
                )
            await pc.set_remote_description(answer["sdp"], "answer")
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
        ack = link.sink_replies.expect()
        started = time.perf_counter()
        link.sink.send(f"begin:{total}")
        for chunk in chunks:
            if link.sink.buffered_amount > HIGH_WATER_BYTES:
                link.buffer_low.clear()
                await asyncio.wait_for(link.buffer_low.wait(), self._config.step_timeout_s)
            link.sink.send(chunk)
        reply = await asyncio.wait_for(ack, self._config.step_timeout_s)
        elapsed = time.perf_counter() - started
        if reply != f"ack:{total}":
            raise BenchError(Reason.BENCH_FAILED, f"receiver answered {reply!r:.80}")
        return elapsed


async def run_offerer(config: RawConfig) -> None:
    async with stdin_lines() as reader:
        await measure(Offerer(config, reader), config)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("offer", "answer"):
        print(
            "usage: python -m swarm_notebook.bench.raw_backend_peer offer|answer CONFIG_JSON",
            file=sys.stderr,
        )
        return 2
    try:
        config = RawConfig.from_json(argv[1])
        asyncio.run(run_offerer(config) if argv[0] == "offer" else answer_offers())
    except Exception as exc:
        emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    emit({"type": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
