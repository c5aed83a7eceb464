"""Connect time, RTT and 5 MB time on the network test bed, per kind of link.

Needs root (network namespaces) and coturn::

    sudo PYTHONPATH=. .venv/bin/python -m tests.support.netbed_bench [--json FILE] [--rounds N]

Cases: ``direct`` (a LAN link over host candidates: the worker on router A's LAN side, the
notebook on host A), ``srflx`` (both behind cone NATs, STUN), ``relay`` (the worker behind
the symmetric NAT, STUN + TURN), ``impaired`` (``srflx`` with 100 ms one-way delay and 2 %
loss on one uplink). ``connect_s`` runs from calling ``join()`` to the link being up and
authenticated (signaling, ICE, DTLS, SCTP, link proof, card exchange); ``delegate_rtt_ms``
is the median of small ``python-computation`` delegations (sandboxed run included);
``link_rtt_ms`` the mesh heartbeat's; ``bulk_5mb_s`` one task with a 5 MB input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.support.netbed import NetBed
from tests.support.netbed_peers import (
    STUN,
    NsWorker,
    Pair,
    rest_credentials,
    running_bed,
    start_joiner,
    turn_entry,
)

BULK_TIMEOUT_S = 100.0


async def measure(
    net: NetBed, work: Path, name: str, rounds: int, impaired: bool = False
) -> dict[str, Any]:
    pair = Pair()
    helper = None
    room = f"bench-{name}"
    try:
        if name == "relay":
            user, credential = rest_credentials("worker")
            worker_ns, joiner_ns = net.host_b, net.host_a
            worker_args = ["--ice-server", STUN, "--ice-server", "turn:198.18.0.1:3478",
                           "--ice-username", user, "--ice-credential", credential]  # fmt: skip
            join_servers = [{"urls": STUN}, turn_entry("joiner")]
        elif name == "direct":
            worker_ns, joiner_ns, worker_args, join_servers = net.router_a, net.host_a, [], []
        else:
            worker_ns, joiner_ns = net.host_a, net.host_c
            worker_args, join_servers = ["--ice-server", STUN], [{"urls": STUN}]
        if impaired:
            helper = net.add_delay(net.router_a, 100.0)
            net.add_loss(net.router_a, 0.02)
        pair.worker = await NsWorker.start(net, worker_ns, room, work / f"{name}-w", *worker_args)
        pair.joiner = await start_joiner(
            net, joiner_ns, room, work / f"{name}-j", ice_servers=join_servers
        )
        ready = next(e for e in pair.joiner.events if e.get("event") == "ready")
        row = await pair.link(timeout=60)
        up = next(e for e in pair.joiner.events if e.get("event") == "peer_up")
        samples = []
        for _ in range(rounds):
            reply = await pair.joiner.call("delegate", mb=0)
            samples.append(reply["seconds"] * 1000.0)
        await asyncio.sleep(1.5)  # let a heartbeat measure the link
        row = next(p for p in (await pair.joiner.call("peers"))["peers"] if p["state"])
        try:
            bulk = await pair.joiner.call(
                "delegate", timeout=BULK_TIMEOUT_S + 10, mb=5, task_timeout=BULK_TIMEOUT_S
            )
            bulk_s: float | str = bulk["seconds"] if bulk.get("success") else "failed"
        except (TimeoutError, RuntimeError) as exc:
            bulk_s = f"did not arrive within {BULK_TIMEOUT_S:g} s ({str(exc)[:80]})"
        return {
            "case": f"{name}{' + 100 ms, 2 % loss' if impaired else ''}",
            "route": row.get("route"),
            "connect_s": round(up["t"] - ready["join_started"], 2),
            "delegate_rtt_ms": round(statistics.median(samples), 1),
            "link_rtt_ms": round(row["rtt_ms"], 1) if row.get("rtt_ms") else None,
            "bulk_5mb_s": round(bulk_s, 2) if isinstance(bulk_s, float) else bulk_s,
        }
    finally:
        if impaired:
            net.remove_loss(net.router_a, 0.02)
            if helper is not None:
                net.remove_delay(net.router_a, helper)
        await pair.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", default="direct,srflx,relay,impaired")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, running_bed(Path(tmp)) as net:
        for case in args.only.split(","):
            name, impaired = ("srflx", True) if case == "impaired" else (case, False)
            result = await measure(net, Path(tmp), name, args.rounds, impaired)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
