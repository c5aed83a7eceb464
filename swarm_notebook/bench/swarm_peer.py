"""A swarm peer for the benchmark, in its own process, driven by JSON lines on stdin.

It joins through the public ``join()`` (signaling, mesh, coordinator, network thread) and
measures from its main thread through the same bridge a notebook uses, so the numbers
include everything the swarm adds on top of a raw data channel.

Commands: join, wait_peers, rtt, bulk, quit. Replies: one JSON line each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from typing import Any

from swarm_notebook.client import Coordinator, join

ECHO = "bench.echo"
DIGEST = "bench.digest"


def emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def wait_peers(c: Coordinator, n: int, timeout: float) -> float:
    started = time.perf_counter()
    while len(c._core.node.connected_peers()) < n:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(
                f"{len(c._core.node.connected_peers())} of {n} peers after {timeout} s"
            )
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def rtt(c: Coordinator, peer: str, n: int) -> dict[str, list[float]]:
    """Round trips timed on the network loop (the stack itself) and from the main thread
    through the bridge a notebook uses (the stack plus one thread hop each way)."""
    endpoint = c._core.node.endpoint
    payload = b"x" * 32

    async def on_loop() -> list[float]:
        for _ in range(20):
            await endpoint.request(peer, ECHO, payload, timeout=10)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await endpoint.request(peer, ECHO, payload, timeout=10)
            samples.append((time.perf_counter() - start) * 1000)
        return samples

    stack = await c._runner.call(on_loop())
    bridged = []
    for _ in range(n):
        start = time.perf_counter()
        await c._runner.call(endpoint.request(peer, ECHO, payload, timeout=10))
        bridged.append((time.perf_counter() - start) * 1000)
    return {"stack": stack, "bridged": bridged}


async def bulk(c: Coordinator, peer: str, size: int, rounds: int) -> list[float]:
    endpoint = c._core.node.endpoint
    payload = bytes(size)
    expected = hashlib.sha256(payload).hexdigest()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        digest = await c._runner.call(endpoint.request(peer, DIGEST, payload, timeout=120))
        elapsed = time.perf_counter() - start
        if digest != expected:
            raise RuntimeError("bulk payload arrived corrupted")
        samples.append(size / elapsed / 1e6)
    return samples


async def main() -> int:
    reader = asyncio.StreamReader(limit=1 << 20)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    coordinator: Coordinator | None = None
    emit(event="ready")
    while line := await reader.readline():
        cmd = json.loads(line)
        name = cmd.get("cmd")
        try:
            if name == "quit":
                break
            if name == "join":
                coordinator = await join(
                    cmd["room"], signaling=cmd["signaling"], profile=cmd["profile"]
                )
                endpoint = coordinator._core.node.endpoint
                endpoint.register_message_handler(ECHO, lambda peer, body: body)
                endpoint.register_message_handler(
                    DIGEST, lambda peer, body: hashlib.sha256(body).hexdigest()
                )
                emit(reply="join", peer_id=coordinator.peer_id)
            elif coordinator is None:
                raise RuntimeError("join first")
            elif name == "wait_peers":
                seconds = await wait_peers(
                    coordinator, int(cmd["n"]), float(cmd.get("timeout", 60))
                )
                emit(reply="wait_peers", seconds=seconds)
            elif name == "rtt":
                emit(reply="rtt", **await rtt(coordinator, cmd["peer"], int(cmd["n"])))
            elif name == "bulk":
                samples = await bulk(coordinator, cmd["peer"], int(cmd["size"]), int(cmd["rounds"]))
                emit(reply="bulk", samples=samples)
            else:
                raise ValueError(f"unknown command {name!r}")
        except Exception as exc:
            emit(reply=name, error=f"{type(exc).__name__}: {exc}")
    if coordinator is not None:
        await coordinator.leave()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
