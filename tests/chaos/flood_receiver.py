"""A mesh peer with small, documented reassembly limits, for the partial-chunk flood test.

Driven by ``tests.support.procs.PeerProcess`` (JSON lines on stdin/stdout). It answers
``echo`` requests over the swarm so the flooding side can tell when every frame it sent
has been processed (the data channel is ordered), and reports its reassembly state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from swarm_notebook.identity import Identity
from swarm_notebook.protocol.framing import ReassemblyLimits
from swarm_notebook.transport.endpoint import Endpoint
from swarm_notebook.transport.factory import mesh_transport
from swarm_notebook.transport.mesh import MeshConfig, MeshTransport


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def reassembly_state(transport: MeshTransport) -> dict[str, Any]:
    links = transport._links.values()
    return {
        "pending_bytes": sum(link.reassembler.pending_bytes for link in links),
        "pending_transfers": sum(link.reassembler.pending_transfers for link in links),
        "connected": transport.connected_peers(),
        "rejections": dict(transport.rejections.by_reason),
        "frames_in": transport.counters["frames_in"],
        "bytes_in": transport.counters["bytes_in"],
    }


async def serve(args: argparse.Namespace) -> int:
    limits = ReassemblyLimits(
        max_message_bytes=args.max_message_mb * 2**20,
        max_pending_bytes=args.max_pending_mb * 2**20,
        max_transfers=args.max_transfers,
    )
    config = MeshConfig(reassembly=limits, max_message_bytes=limits.max_message_bytes)
    transport = mesh_transport(
        Identity.load_or_create(args.profile), args.signaling, args.room, config=config
    )
    endpoint = Endpoint(transport)
    endpoint.register_message_handler("echo", lambda peer, body: body)
    await transport.start()
    emit(event="ready", peer_id=transport.local_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "state":
            emit(reply_to=cmd["call"], **reassembly_state(transport))
        else:
            emit(reply_to=cmd["call"], error=f"unknown command {cmd['cmd']!r}")
    await endpoint.close()
    await transport.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--max-pending-mb", type=int, required=True)
    parser.add_argument("--max-transfers", type=int, required=True)
    parser.add_argument("--max-message-mb", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
