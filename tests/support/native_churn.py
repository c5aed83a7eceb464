"""Connection churn on the native backend in one process, for ``test_native_backend``.

Links are made while others carry traffic in both directions (our callbacks busy on
libdatachannel's threads), and closed in the middle of that traffic, in both orders. Each
of these once deadlocked on the GIL; a hang here dumps every thread's stack and exits 1.
Prints one JSON line with what happened.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import sys

from swarm_notebook.transport.backends.base import BackendConfig, DataChannel
from swarm_notebook.transport.backends.native_backend import NativeBackend, NativeChannel

CONFIG = BackendConfig(host_addresses=["127.0.0.1"])


async def linked_pair(volley: int) -> tuple[NativeBackend, NativeBackend, list[int]]:
    """Two connected backends whose channel bounces ``volley`` messages forever."""
    a, b = NativeBackend(CONFIG), NativeBackend(CONFIG)
    opened = asyncio.Event()
    warm = asyncio.Event()  # 20 messages bounced: traffic is flowing
    bounced = [0]
    channel = a.create_channel("swarm")
    channel.events.on_open = opened.set
    channel.events.on_message = channel.send

    def on_channel(theirs: DataChannel) -> None:
        def echo(data: bytes | str) -> None:
            bounced[0] += 1
            if bounced[0] >= 20:
                warm.set()
            theirs.send(data)

        theirs.events.on_message = echo

    b.on_channel = on_channel
    await b.set_remote_description(await a.create_offer(), "offer")
    await a.set_remote_description(await b.create_answer(), "answer")
    await asyncio.wait_for(opened.wait(), 10)
    for _ in range(volley):
        channel.send(b"x" * 16_000)
    await asyncio.wait_for(warm.wait(), 10)
    return a, b, bounced


async def main(rounds: int) -> dict[str, object]:
    background = [await linked_pair(8) for _ in range(2)]
    closed_mid_traffic = 0
    for i in range(rounds):
        a, b, _ = await linked_pair(4)
        assert a.selected_route() is not None and "host" in a.gathered_types()
        if i % 2:
            await asyncio.gather(a.close(), b.close())
        else:
            await b.close()
            await a.close()
        closed_mid_traffic += 1
    counts = [bounced[0] for _, _, bounced in background]
    failures = 0
    for a, b, _ in background:
        failures += sum(
            c.send_failures for c in a._channels + b._channels if isinstance(c, NativeChannel)
        )
        await a.close()
        await b.close()
    return {"rounds": closed_mid_traffic, "background": counts, "send_failures": failures}


if __name__ == "__main__":
    faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
