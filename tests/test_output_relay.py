"""The live-output relay (serving side) and log (delegating side), without a network.

The relay's throttle, cap and ordering are properties of the relay alone; the real-worker
tests in test_live_output.py prove the same end to end.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol.envelope import convert_body
from swarm_notebook.workload.messages import MAX_OUTPUT_MESSAGE_CHARS, OutputChunk, TaskOutput
from swarm_notebook.workload.output import OutputLog, OutputRelay


class Sink:
    """Collects sent messages; ``gate`` holds every send until the test opens it."""

    def __init__(self) -> None:
        self.messages: list[TaskOutput] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Event()

    async def send(self, message: TaskOutput) -> None:
        await self.gate.wait()
        self.messages.append(message)
        self.arrived.set()

    def text(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for m in self.messages:
            for c in m.chunks:
                if out and out[-1][0] == c.stream:
                    out[-1] = (c.stream, out[-1][1] + c.text)
                else:
                    out.append((c.stream, c.text))
        return out


async def test_output_goes_out_in_order_and_batched_while_a_send_is_in_flight() -> None:
    sink = Sink()
    relay = OutputRelay(sink.send, "t1", interval_s=0.05)
    sink.gate.clear()
    relay.push([("stdout", "a\n")])  # the flusher takes this one and waits on the gate
    for i in range(500):  # meanwhile the task keeps printing; push never waits
        relay.push([("stdout", f"{i}\n"), ("stderr", f"e{i}\n")])
    sink.gate.set()
    await relay.close()
    assert [m.seq for m in sink.messages] == list(range(len(sink.messages)))
    assert len(sink.messages) <= 3  # 1001 pushes, a handful of messages
    expected = [("stdout", "a\n0\n"), ("stderr", "e0\n")]
    for i in range(1, 500):
        expected += [("stdout", f"{i}\n"), ("stderr", f"e{i}\n")]
    assert sink.text() == expected


async def test_a_tight_loop_costs_one_message_per_interval() -> None:
    sink = Sink()
    relay = OutputRelay(sink.send, "t1", interval_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    pushes = 0
    while loop.time() - started < 0.6:
        relay.push([("stdout", "x")])
        pushes += 1
        await asyncio.sleep(0)  # the task's loop turns, as the pool's reader does
    elapsed = loop.time() - started
    await relay.close()
    assert pushes > 100
    assert len(sink.messages) <= elapsed / 0.1 + 2
    assert "".join(t for _, t in sink.text()) == "x" * pushes


async def test_output_past_the_cap_is_cut_and_said_once() -> None:
    sink = Sink()
    relay = OutputRelay(sink.send, "t1", max_bytes=1000)
    relay.push([("stdout", "é" * 400)])  # 800 bytes
    relay.push([("stdout", "y" * 500), ("stderr", "z" * 50)])
    await relay.close()
    text = sink.text()
    assert text[0] == ("stdout", "é" * 400 + "y" * 200 + "\n[output truncated: 350 bytes]\n")
    assert len(text) == 1 and relay.dropped == 350


async def test_large_output_is_split_into_bounded_messages() -> None:
    sink = Sink()
    relay = OutputRelay(sink.send, "t1", max_bytes=2_000_000)
    relay.push([("stdout", "q" * 600_000)])
    await relay.close()
    sizes = [sum(len(c.text) for c in m.chunks) for m in sink.messages]
    assert len(sizes) == 3 and max(sizes) <= MAX_OUTPUT_MESSAGE_CHARS
    assert sink.text() == [("stdout", "q" * 600_000)]
    # each message is valid for the receiver's schema
    for m in sink.messages:
        convert_body(msgspec.to_builtins(m), TaskOutput)


async def test_a_failing_link_stops_the_relay_without_raising() -> None:
    async def broken(_: TaskOutput) -> None:
        raise ConnectionError("gone")

    relay = OutputRelay(broken, "t1")
    relay.push([("stdout", "a")])
    await relay.close()
    assert relay.send_failures == 1


def test_the_log_refuses_gaps_and_replays_and_starts_again_for_a_retry() -> None:
    log = OutputLog(max_bytes_per_task=10)
    seen: list[tuple[str, str]] = []
    log.watch("t", lambda s, t: seen.append((s, t)))
    chunk = [OutputChunk("stdout", "ab")]
    assert log.accept("t", "p1", TaskOutput("t", 0, chunk)) is None
    assert log.accept("t", "p1", TaskOutput("t", 0, chunk)) is not None  # replay
    assert log.accept("t", "p1", TaskOutput("t", 2, chunk)) is not None  # gap
    assert log.accept("t", "p1", TaskOutput("t", 1, [OutputChunk("stderr", "e")])) is None
    assert log.accept("t", "p2", TaskOutput("t", 0, [OutputChunk("stdout", "0123456789")])) is None
    entry = log.get("t")
    assert entry is not None
    assert entry.text("stdout") == "ab0123456" and entry.text("stderr") == "e"
    assert entry.dropped == 3
    assert seen == [("stdout", "ab"), ("stderr", "e"), ("stdout", "0123456")]


def test_the_wire_schema_is_bounded() -> None:
    with pytest.raises(ProtocolError):
        convert_body({"task_id": "t", "seq": 0, "chunks": [["stdin", "x"]]}, TaskOutput)
    with pytest.raises(ProtocolError):
        big = "x" * (MAX_OUTPUT_MESSAGE_CHARS + 1)
        convert_body({"task_id": "t", "seq": 0, "chunks": [["stdout", big]]}, TaskOutput)
    with pytest.raises(ProtocolError):
        convert_body({"task_id": "t", "seq": -1, "chunks": []}, TaskOutput)
    with pytest.raises(ProtocolError):
        convert_body({"task_id": "t" * 65, "seq": 0, "chunks": []}, TaskOutput)
