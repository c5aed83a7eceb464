"""A notebook-like peer for the network test bed: ``join()`` driven by JSON lines.

Run inside a host namespace (``ip netns exec``); driven by ``procs.PeerProcess``. Commands:
``peers`` (``get_stats()["peers"]``), ``doctor`` (``Coordinator.doctor()``), ``delegate``
(``mb`` of input to ``len()``, or a plain ``1 + 1`` when ``mb`` is 0), ``quit``. Events:
``ready``, ``peer_up``, ``peer_down``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

import swarm_notebook
from swarm_notebook.errors import SwarmError
from swarm_notebook.views.doctor import render

_lock = threading.Lock()


def emit(**event: Any) -> None:
    with _lock:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--join-kwargs", default="{}", help="JSON: ice_servers, ice_policy")
    args = parser.parse_args()
    join_started = time.time()
    try:
        c = await swarm_notebook.join(
            args.room,
            signaling=args.signaling,
            profile=args.profile,
            **json.loads(args.join_kwargs),
        )
    except SwarmError as exc:
        emit(event="join_failed", reason=str(exc.reason), message=exc.message)
        return 1
    c.on("swarm:peer-joined", lambda p: emit(event="peer_up", peer=p["peer_id"], t=time.time()))
    c.on("swarm:peer-left", lambda p: emit(event="peer_down", peer=p["peer_id"], t=time.time()))
    emit(event="ready", peer_id=c.peer_id, t=time.time(), join_started=join_started)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            call, cmd = request.get("call"), request.get("cmd")
            if cmd == "quit":
                break
            try:
                if cmd == "peers":
                    emit(reply_to=call, peers=c.get_stats()["peers"])
                elif cmd == "doctor":
                    emit(reply_to=call, report=render(await c.doctor()))
                elif cmd == "delegate":
                    size = int(request.get("mb", 0) * 2**20)
                    task = (
                        {"code": "len(blob)", "inputs": {"blob": b"\x5a" * size}}
                        if size
                        else {"code": "1 + 1"}
                    )
                    started = time.perf_counter()
                    result = await c.delegate_task(
                        "python-computation", task, timeout=request.get("task_timeout", 60)
                    )
                    emit(
                        reply_to=call,
                        success=result.get("success"),
                        value=result.get("value"),
                        seconds=time.perf_counter() - started,
                    )
                else:
                    emit(reply_to=call, error=f"unknown command {cmd!r}")
            except SwarmError as exc:
                emit(reply_to=call, error=f"{exc.reason}: {exc.message}")
    finally:
        await c.leave()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
