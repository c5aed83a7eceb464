"""An attacker holding a real key, in its own process, talking raw signaling.

``--mode spellings``: join the room once under every spelling of the key's id that a
lenient decoder accepts (the canonical one and 16 others) and report what was admitted.
``--mode thief``: join under the canonical id of a key copied from another peer's
profile (it takes that peer's place), then report when it is itself replaced.

Events are JSON lines on stdout; a ``quit`` line (or EOF) on stdin ends it, closing every
socket it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from swarm_notebook.identity import Identity
from swarm_notebook.protocol.signaling import (
    Challenge,
    Error,
    Join,
    Joined,
    decode_server_message,
    encode,
    join_payload,
)
from tests.support.spellings import other_spellings


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def join_as(
    http: aiohttp.ClientSession, url: str, room: str, identity: Identity, claim: str
) -> tuple[aiohttp.ClientWebSocketResponse, Any]:
    ws = await http.ws_connect(url)
    challenge = decode_server_message((await ws.receive()).data)
    assert isinstance(challenge, Challenge)
    signature = identity.sign(join_payload(challenge.nonce, room, claim)).hex()
    await ws.send_str(encode(Join(room=room, peer_id=claim, signature=signature)))
    msg = await ws.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT:
        return ws, None
    return ws, decode_server_message(msg.data)


async def spellings(http: aiohttp.ClientSession, args: argparse.Namespace) -> list[Any]:
    identity = Identity.load_or_create(Path(args.profile))
    held = []
    admitted: list[str] = []
    refused: Counter[str] = Counter()
    for claim in [identity.peer_id, *other_spellings(identity.peer_id)]:
        ws, reply = await join_as(http, args.signaling, args.room, identity, claim)
        if isinstance(reply, Joined):
            admitted.append(claim)
            held.append(ws)
        else:
            refused[reply.reason if isinstance(reply, Error) else "closed"] += 1
            await ws.close()
    emit(event="joins", tried=len(admitted) + sum(refused.values()), admitted=admitted,
         refused=dict(refused))  # fmt: skip
    return held


async def thief(http: aiohttp.ClientSession, args: argparse.Namespace) -> list[Any]:
    stolen = Identity.load(Path(args.profile) / "identity.pem")
    ws, reply = await join_as(http, args.signaling, args.room, stolen, stolen.peer_id)
    emit(event="joined" if isinstance(reply, Joined) else "refused", peer_id=stolen.peer_id)

    async def watch() -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                message = decode_server_message(msg.data)
                if isinstance(message, Error):
                    emit(event="error", reason=message.reason)
        emit(event="socket-closed")

    return [ws, asyncio.ensure_future(watch())]


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signaling", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--mode", choices=("spellings", "thief"), required=True)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession() as http:
        held = await (spellings if args.mode == "spellings" else thief)(http, args)
        while line := await reader.readline():
            if b"quit" in line:
                break
        for item in held:
            if isinstance(item, asyncio.Future):
                item.cancel()
            else:
                await item.close()
    emit(event="closed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
