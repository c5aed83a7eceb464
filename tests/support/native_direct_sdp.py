"""Child of ``test_direct_backend``: libdatachannel links when both SDPs carry the direct
path's ``a=x-`` lines (a native peer in a room with direct peers ignores them).

Run with a Python that has libdatachannel-py; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json

from swarm_notebook.transport.backends.base import BackendConfig
from swarm_notebook.transport.backends.direct_sdp import (
    OK_ATTRIBUTE,
    accepted,
    add_session_line,
    offer_line,
)
from swarm_notebook.transport.backends.native_backend import NativeBackend


async def main() -> None:
    a = NativeBackend(BackendConfig(host_addresses=["127.0.0.1"]))
    b = NativeBackend(BackendConfig(host_addresses=["127.0.0.1"]))
    try:
        channel = a.create_channel("swarm")
        opened = asyncio.Event()
        channel.events.on_open = opened.set
        offer = add_session_line(await a.create_offer(), offer_line("127.0.0.1", 9, "ab" * 16))
        await b.set_remote_description(offer, "offer")
        answer = add_session_line(await b.create_answer(), OK_ATTRIBUTE)
        await a.set_remote_description(answer, "answer")
        await asyncio.wait_for(opened.wait(), 20)
        print(json.dumps({"linked": True, "ok_line": accepted(answer)}))
    finally:
        await a.close()
        await b.close()


if __name__ == "__main__":
    asyncio.run(main())
