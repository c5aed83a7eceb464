"""A bare mesh peer in its own process, for transport tests (driven by ``procs.PeerProcess``).

The network runs on a ``LoopThread``; the main thread plays the notebook kernel and can be
blocked on purpose with the ``block`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.errors import SwarmError
from swarm_notebook.identity import Identity
from swarm_notebook.protocol.framing import ReassemblyLimits
from swarm_notebook.transport.endpoint import Endpoint
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig, MeshTransport

_print_lock = threading.Lock()


def emit(**event: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def inject_direct_fault(fault: str) -> None:
    """Make this peer's direct path misbehave one way (a test's attacker or stranger)."""
    from aiortc.rtcdtlstransport import RTCCertificate

    from swarm_notebook.transport.backends import direct_backend, direct_tls
    from swarm_notebook.transport.backends.direct_sdp import DirectOffer

    honest_connect = direct_backend.connect
    if fault == "wrong-cert":
        # Serve TLS with another certificate than the one the offer's fingerprint names.
        def other_certificate(pc: Any) -> direct_tls.CertificatePair:
            other = RTCCertificate.generateCertificate()
            return other._cert, other._key

        direct_tls.dtls_certificate = other_certificate  # type: ignore[assignment]
    elif fault == "wrong-token":

        async def wrong_token(offer: DirectOffer, fingerprint: str, timeout: float) -> Any:
            forged = DirectOffer(offer.host, offer.port, "0" * len(offer.token))
            return await honest_connect(forged, fingerprint, timeout)

        direct_backend.connect = wrong_token  # type: ignore[assignment]
    elif fault == "stranger":
        # Before dialling honestly, play two strangers who found the listener: one sends
        # bytes that are not TLS, one speaks TLS but sends a token frame of garbage.
        async def strangers_first(offer: DirectOffer, fingerprint: str, timeout: float) -> Any:
            import ssl

            for context in (None, direct_tls.client_context()):
                reader, writer = await asyncio.open_connection(
                    offer.host, offer.port, ssl=context, server_hostname="" if context else None
                )
                writer.write(b"\x00\x00\x00\x10" + os.urandom(16) if context else b"GET /\r\n")
                try:
                    await asyncio.wait_for(reader.read(), 5.0)  # until the listener drops us
                except (ConnectionError, ssl.SSLError):
                    pass
                writer.close()
            return await honest_connect(offer, fingerprint, timeout)

        direct_backend.connect = strangers_first  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown direct fault {fault}")


async def build(args: argparse.Namespace) -> tuple[MeshTransport, Endpoint]:
    identity = Identity.load_or_create(args.profile)
    config = MeshConfig(heartbeat_interval_s=0.5, peer_timeout_s=2.5, backend=args.backend)
    if args.direct_fault:
        inject_direct_fault(args.direct_fault)
    if args.max_message_kb:
        config.max_message_bytes = args.max_message_kb * 1024
        config.reassembly.max_message_bytes = args.max_message_kb * 1024
    if args.reassembly_total_kb:
        config.reassembly = ReassemblyLimits(
            max_message_bytes=config.reassembly.max_message_bytes,
            max_pending_bytes=args.reassembly_total_kb * 1024,
            max_total_pending_bytes=args.reassembly_total_kb * 1024,
            max_transfers=1000,
        )
    transport = mesh_transport(
        identity, args.signaling, args.room, secret=args.secret, config=config
    )
    if args.hold_auth:
        # Open the data channel but never prove our key: the link stays unauthenticated.
        transport._maybe_send_auth = lambda link: None  # type: ignore[method-assign]
    endpoint = Endpoint(transport)
    endpoint.register_message_handler("echo", lambda peer, body: body)
    endpoint.register_message_handler("blob", lambda peer, body: os.urandom(int(body)))
    endpoint.register_message_handler(
        "digest",
        lambda peer, body: hashlib.sha256(body).hexdigest() if isinstance(body, bytes) else None,
    )
    transport.callbacks.on_peer_up = lambda p: emit(event="peer_up", peer=p, t=time.time())

    def down(peer: str, reason: str) -> None:
        endpoint.fail_pending_for(peer, reason)
        emit(event="peer_down", peer=peer, reason=reason, t=time.time())

    transport.callbacks.on_peer_down = down
    await transport.start()
    if args.bad_link_key:
        # Signaling accepted our real key; now prove the link with a different one.
        transport.identity = Identity.generate()
    return transport, endpoint


async def handle(
    cmd: dict[str, Any], transport: MeshTransport, endpoint: Endpoint, runner: LoopThread
) -> dict[str, Any]:
    name = cmd["cmd"]
    if name == "peers":
        return {"connected": transport.connected_peers(), "members": transport.room_members()}
    if name == "links":
        return {
            "links": [{**vars(info), "state": info.state.value} for info in transport.link_info()]
        }
    if name in ("kill_stream", "oversize"):
        # Under the direct backend's stream: a reset, or a frame header over the cap.
        async def underneath() -> None:
            channel = getattr(transport._links[cmd["peer"]].pc, "channel", None)
            assert channel is not None, "the link is not on a direct stream"
            if name == "kill_stream":
                channel.stream.transport.abort()
            else:
                channel.stream.transport.write((2 * 1024 * 1024).to_bytes(4, "big"))

        await runner.call(underneath())
        return {"done": name}
    if name == "stats":
        return {
            "stats": transport.stats(),
            "endpoint_rejections": dict(endpoint.rejections),
            "received": dict(endpoint.received),
            "refused_by_peers": dict(endpoint.refused_by_peers),
        }
    if name == "ask":
        # A request whose failure is an answer too: the reason says how it ended.
        body = cmd["body"] if "body" in cmd else os.urandom(int(cmd["size"]))
        started = time.perf_counter()
        try:
            await runner.call(
                endpoint.request(cmd["peer"], cmd["type"], body, timeout=float(cmd["wait"]))
            )
        except SwarmError as exc:
            return {
                "ok": False,
                "raised": type(exc).__name__,
                "reason": str(exc.reason),
                "seconds": time.perf_counter() - started,
            }
        return {"ok": True, "seconds": time.perf_counter() - started}
    if name == "request":
        payload = os.urandom(int(cmd["size"]))
        started = time.perf_counter()
        reply = await runner.call(endpoint.request(cmd["peer"], "echo", payload, timeout=60))
        elapsed = time.perf_counter() - started
        return {"identical": reply == payload, "bytes": len(payload), "seconds": elapsed}
    if name == "raw":
        frames = [bytes.fromhex(f) for f in cmd["frames"]]
        text = cmd.get("text")

        async def send_raw() -> None:
            if cmd.get("before_auth"):  # wait for our half-open, unauthenticated link
                deadline = time.monotonic() + 20
                while True:
                    link = transport._links.get(cmd["peer"])
                    channel = link.channel if link is not None else None
                    if channel is not None and channel.is_open:
                        break
                    assert time.monotonic() < deadline, "no open channel to the peer"
                    await asyncio.sleep(0.02)
            link = transport._links[cmd["peer"]]
            assert link.channel is not None
            for frame in frames:
                link.channel.send(frame)
            if text:
                link.channel.send(text)

        await runner.call(send_raw())
        return {"sent": len(frames)}
    if name == "drop_link":
        # Kill the link underneath the transport, as a network fault would.
        async def drop() -> None:
            await transport._links[cmd["peer"]].pc.close()

        await runner.call(drop())
        return {"dropped": cmd["peer"]}
    if name == "block":
        time.sleep(float(cmd["seconds"]))  # noqa: ASYNC251  # a cell doing synchronous work on the kernel thread
        return {"blocked": cmd["seconds"]}
    raise ValueError(f"unknown command {name}")


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", default="test")
    parser.add_argument("--secret")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--bad-link-key", action="store_true")
    parser.add_argument("--hold-auth", action="store_true")
    parser.add_argument("--max-message-kb", type=int, default=0)
    parser.add_argument("--reassembly-total-kb", type=int, default=0)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--direct-fault", choices=("wrong-cert", "wrong-token", "stranger"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # MESH_PEER_LOG=INFO shows the transport's own log (refusals), for tests that read it.
    logging.getLogger("swarm_notebook").setLevel(os.environ.get("MESH_PEER_LOG", "WARNING"))
    runner = LoopThread()
    runner.start()
    transport, endpoint = runner.run_sync(build(args), timeout=30)
    emit(event="ready", peer_id=transport.local_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            result = await handle(cmd, transport, endpoint, runner)
            emit(reply_to=cmd["call"], **result)
        except Exception as exc:
            emit(reply_to=cmd["call"], error=f"{type(exc).__name__}: {exc}")

    async def shutdown() -> int:
        await endpoint.close()
        await transport.close()
        current = asyncio.current_task()

        def pending() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if t is not current and not t.done()]

        # aiortc's own close callbacks finish a few loop turns later (longer on a busy
        # machine): wait on them, up to a bound, then report whatever is still pending.
        deadline = time.monotonic() + 5.0
        while (waiting := pending()) and time.monotonic() < deadline:
            await asyncio.wait(waiting, timeout=deadline - time.monotonic())
        left = pending()
        for task in left:
            print(f"pending at close: {task.get_coro()!r}", file=sys.stderr)
        return len(left)

    leftover_tasks = runner.run_sync(shutdown(), timeout=30)
    runner.stop()
    import psutil

    sockets = [c for c in psutil.Process().net_connections(kind="inet")]
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    emit(event="closed", tasks=leftover_tasks, sockets=len(sockets), threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
