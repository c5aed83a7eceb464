"""A hostile worker: answers every python-computation with a decompression bomb.

Each of its eight outputs is a zstd-compressed Arrow stream of a few kilobytes that
declares hundreds of megabytes once decompressed (Finding 5 of the security pass). The
process joins like a real worker (``join()`` over the mesh) and only replaces the task
handler. Driven by ``procs.PeerProcess``: prints ``{"event": "ready", "peer_id": ...}`` and
quits on ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as pa_ipc

from swarm_notebook.client import join
from swarm_notebook.workload.messages import TASK_EXECUTION, TaskRequest


def bomb_stream(decompressed_bytes: int) -> bytes:
    table = pa.table({"a": np.zeros(decompressed_bytes // 8)})
    sink = pa.BufferOutputStream()
    options = pa_ipc.IpcWriteOptions(compression="zstd")
    with pa_ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--outputs", type=int, default=8)
    parser.add_argument("--mb-each", type=int, default=230)
    args = parser.parse_args()
    stream = bomb_stream(args.mb_each * 1024 * 1024)
    outputs = {f"out{i}": {"__sn__": "df", "data": stream} for i in range(args.outputs)}
    c = await join(
        args.room,
        signaling=args.signaling,
        profile=args.profile,
        capabilities=["python-execution"],
    )

    async def bomb(peer_id: str, request: TaskRequest) -> dict[str, Any]:
        emit(event="bombed", peer=peer_id, wire_bytes=len(stream) * len(outputs))
        return {"success": True, "value": None, "outputs": outputs, "task_id": request.task_id}

    endpoint = c._core.node.endpoint  # test support: a hostile peer may reach anywhere

    async def replace() -> None:  # on the coordinator's loop, where handlers run
        endpoint.register_message_handler(TASK_EXECUTION, bomb, schema=TaskRequest)

    await c._call(replace())
    emit(event="ready", peer_id=c.peer_id, wire_bytes=len(stream) * len(outputs))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
    await c.leave()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
