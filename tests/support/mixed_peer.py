"""A notebook-like peer in its own process (possibly another Python and transport backend).

Driven by ``procs.PeerProcess`` (JSON lines). It joins with the public ``join()`` and
runs others' Python, so a test can delegate to it and make it delegate back. The backend
comes from ``$SWARM_NOTEBOOK_TRANSPORT_BACKEND`` as for any peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import swarm_notebook


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, default=repr) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--profile", required=True)
    args = parser.parse_args()
    c = await swarm_notebook.join(
        args.room,
        signaling=args.signaling,
        profile=Path(args.profile),
        capabilities=["python-execution"],
        name="mixed-peer",
    )
    stats = c.get_stats()
    emit(
        event="ready",
        peer_id=stats["local_peer_id"],
        backend=stats["transport_backend"],
        python=list(sys.version_info[:2]),
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            call = cmd.get("call")
            if cmd["cmd"] == "quit":
                break
            try:
                if cmd["cmd"] == "delegate":
                    result = await c.delegate_task(
                        "python-computation", {"code": cmd["code"]}, timeout=60
                    )
                    emit(reply_to=call, result=result)
                elif cmd["cmd"] == "stats":
                    emit(reply_to=call, stats=c.get_stats())
                else:
                    emit(reply_to=call, error=f"unknown command {cmd['cmd']}")
            except Exception as exc:
                emit(reply_to=call, error=f"{type(exc).__name__}: {exc}")
    finally:
        await c.leave()


if __name__ == "__main__":
    asyncio.run(main())
