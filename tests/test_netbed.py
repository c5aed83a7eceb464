"""Peers on different hosts behind different NATs, in network namespaces (``-m network``).

One "internet" namespace runs the signaling server (the shipped CLI) and coturn; hosts sit
behind cone or symmetric NAT routers (see ``tests/support/netbed.py``). The worker is the
shipped ``swarm-notebook worker`` and the other side is ``join()`` in a script, each run
with ``ip netns exec`` in its own host namespace. Which candidate pair a link selected is
read from aioice's nominated pair and surfaced in ``get_stats()["peers"]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from swarm_notebook.transport.backends.select import backend_name
from tests.support import netbed
from tests.support.netbed import INET_IP, NetBed
from tests.support.netbed_peers import (
    DEAD_STUN,
    ISSUING_PORT,
    PLAIN_PORT,
    STUN,
    STUN2,
    TURN,
    TURN_TCP,
    TURNS,
    NsWorker,
    Pair,
    child_env,
    rest_credentials,
    running_bed,
    signaling_url,
    start_joiner,
    turn_entry,
)

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(netbed.available() is not None, reason=str(netbed.available())),
]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetBed, Path]]:
    work = tmp_path_factory.mktemp("netbed")
    with running_bed(work) as net:
        yield net, work
    assert not [n for n in netbed.leftovers() if net.run_id in n], "namespaces left behind"


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        await p.close()


def room(request: pytest.FixtureRequest) -> str:
    return request.node.name[:60]


async def stun_pair(
    net: NetBed, pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A CLI worker behind cone NAT A and a join() peer behind cone NAT C, both with STUN."""
    pair.worker = await NsWorker.start(
        net, net.host_a, room(request), tmp_path / "w", "--ice-server", STUN
    )
    pair.joiner = await start_joiner(
        net, net.host_c, room(request), tmp_path / "j", ice_servers=[{"urls": STUN}]
    )


async def relay_only_pair(
    net: NetBed,
    pair: Pair,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    worker_turn: str,
    env: dict[str, str] | None = None,
) -> None:
    """Both ends on ``--ice-policy relay``: the worker through ``worker_turn``, the joiner
    through coturn over UDP, each with its own REST credentials."""
    username, credential = rest_credentials("worker")
    pair.worker = await NsWorker.start(
        net, net.host_a, room(request), tmp_path / "w",
        "--ice-server", worker_turn, "--ice-username", username, "--ice-credential", credential,
        "--ice-policy", "relay",
        env=env or {},
    )  # fmt: skip
    pair.joiner = await start_joiner(
        net, net.host_c, room(request), tmp_path / "j",
        ice_servers=[turn_entry("joiner")], ice_policy="relay",
    )  # fmt: skip


async def test_cone_nats_with_stun_link_via_server_reflexive_candidates(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    await stun_pair(net, pair, request, tmp_path)
    row = await pair.link()
    assert row["route"] == "srflx", row
    assert row["ice_server"] == STUN
    reply = await pair.joiner.call("delegate", mb=0)
    assert reply["success"] and reply["value"] == 2
    # The same per-link facts in the notebook's doctor (``%swarm doctor``).
    report = (await pair.joiner.call("doctor", timeout=60))["report"]
    # aioice names a server-reflexive local candidate by its host base; libjuice by its type.
    local = "srflx" if backend_name() == "native" else "host"
    assert f"ok   link {pair.worker.peer_id[:16]}: srflx ({local} -> srflx) via {STUN}" in report
    assert f"ok   {STUN}: mapped address 198.18.3.2:" in report, report


async def test_symmetric_nat_needs_turn_and_links_via_relay(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    username, credential = rest_credentials("worker")
    pair.worker = await NsWorker.start(
        net, net.host_b, room(request), tmp_path / "w",
        "--ice-server", STUN, "--ice-server", TURN,
        "--ice-username", username, "--ice-credential", credential,
    )  # fmt: skip
    pair.joiner = await start_joiner(
        net, net.host_a, room(request), tmp_path / "j",
        ice_servers=[{"urls": STUN}, turn_entry("joiner")],
    )  # fmt: skip
    row = await pair.link()
    assert row["route"] == "relay", row
    assert row["ice_server"] in (STUN, TURN)
    reply = await pair.joiner.call("delegate", mb=0)
    assert reply["success"]


async def test_relay_only_policy_uses_relay_candidates_on_both_ends(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    # The worker reaches coturn over TCP (networks that block UDP), the joiner over UDP.
    await relay_only_pair(net, pair, request, tmp_path, TURN_TCP)
    row = await pair.link()
    # Both cone NATs would allow srflx: relay on both ends is the policy's doing.
    assert (row["local_candidate"], row["remote_candidate"]) == ("relay", "relay"), row
    assert row["ice_server"] == TURN
    reply = await pair.joiner.call("delegate", mb=0)
    assert reply["success"]


async def test_turn_over_tls_relays_for_a_network_that_blocks_udp(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, work = bed
    # turns: on a TLS port, its certificate checked against coturn's address; the worker
    # trusts coturn's self-signed certificate the standard way (SSL_CERT_FILE).
    await relay_only_pair(
        net, pair, request, tmp_path, TURNS, env={"SSL_CERT_FILE": str(work / "coturn.pem")}
    )
    row = await pair.link()
    assert (row["local_candidate"], row["remote_candidate"]) == ("relay", "relay"), row
    reply = await pair.joiner.call("delegate", mb=1)
    assert reply["success"] and reply["value"] == 2**20, reply


async def test_doctor_allocates_over_turns_only_when_the_certificate_is_trusted(
    bed: tuple[NetBed, Path], tmp_path: Path
) -> None:
    net, work = bed
    username, credential = rest_credentials("doctor")
    args = ("--ice-server", TURNS, "--ice-username", username, "--ice-credential", credential)
    code, out = await doctor(net, net.host_a, "--profile", str(tmp_path / "a"), *args)
    assert code == 1 and f"FAIL {TURNS}" in out, out  # coturn's self-signed cert: untrusted
    code, out = await doctor(
        net, net.host_a, "--profile", str(tmp_path / "b"), *args,
        env={"SSL_CERT_FILE": str(work / "coturn.pem")},
    )  # fmt: skip
    assert f"ok   {TURNS}" in out, out


async def test_an_unreachable_first_stun_server_is_rotated_past(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    # aiortc alone would use only the first (dead) URL forever and never get srflx.
    servers = [{"urls": [DEAD_STUN, STUN]}]
    pair.worker = await NsWorker.start(
        net, net.host_a, room(request), tmp_path / "w", "--ice-server", DEAD_STUN,
        "--ice-server", STUN,
    )  # fmt: skip
    pair.joiner = await start_joiner(
        net, net.host_c, room(request), tmp_path / "j", ice_servers=servers
    )
    row = await pair.link(timeout=45)
    assert row["route"] == "srflx", row
    assert row["ice_server"] == STUN, row


async def test_cli_worker_configured_only_by_environment_links(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    servers = json.dumps([{"urls": STUN}, turn_entry("worker")])
    pair.worker = await NsWorker.start(
        net, net.host_b, room(request), tmp_path / "w",
        env={"SWARM_NOTEBOOK_ICE_SERVERS": servers},
    )  # fmt: skip
    pair.joiner = await start_joiner(
        net, net.host_a, room(request), tmp_path / "j",
        ice_servers=[{"urls": STUN}, turn_entry("joiner")],
    )  # fmt: skip
    row = await pair.link()
    assert row["route"] == "relay", row  # the worker is behind the symmetric NAT


async def test_credentials_issued_by_signaling_link_peers_with_no_ice_settings(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    pair.worker = await NsWorker.start(
        net, net.host_b, room(request), tmp_path / "w", port=ISSUING_PORT
    )
    pair.joiner = await start_joiner(net, net.host_a, room(request), tmp_path / "j", ISSUING_PORT)
    row = await pair.link()
    # The worker sits behind the symmetric NAT, so a link at all means it got the issued
    # TURN credentials and relays; the joiner set no servers, so any server it names was
    # issued to it too (its own relay, or the STUN mapping it reached the worker's relay by).
    assert row["route"] == "relay", row
    assert row["ice_server"] in (STUN, TURN), row
    reply = await pair.joiner.call("delegate", mb=0)
    assert reply["success"]


async def test_uplink_cut_is_noticed_within_5_s_and_link_recovers_within_3_s(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    await stun_pair(net, pair, request, tmp_path)
    await pair.link()
    # Cut one side, then the other: one of the two cut sides is the offerer (the smaller
    # id), whose re-dials during the outage can gather only host candidates.
    for router in (net.router_a, net.router_c):
        mark = len(pair.joiner.events)
        cut = time.time()
        net.cut_uplink(router)
        try:
            down = await pair.joiner.wait_for(lambda e: e.get("event") == "peer_down", 10, mark)
            assert down["t"] - cut < 5.0, f"noticed after {down['t'] - cut:.1f} s"
            await asyncio.sleep(max(0.0, cut + 10.0 - time.time()))  # the 10 s outage itself
        finally:
            net.restore_uplink(router)
        restored = time.time()
        up = await pair.joiner.wait_for(lambda e: e.get("event") == "peer_up", 20, mark)
        noticed, back = down["t"] - cut, up["t"] - restored
        assert back < 3.0, f"back {back:.1f} s after restoring {router}"
        print(f"outage at {router}: noticed after {noticed:.1f} s, back {back:.1f} s after restore")
        reply = await pair.joiner.call("delegate", mb=0)
        assert reply["success"]


async def test_5_mb_delegation_completes_over_100_ms_delay_and_2_percent_loss(
    bed: tuple[NetBed, Path], pair: Pair, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    net, _ = bed
    await stun_pair(net, pair, request, tmp_path)
    await pair.link()
    helper = net.add_delay(net.router_a, 100.0)
    net.add_loss(net.router_a, 0.02)
    try:
        small = await pair.joiner.call("delegate", mb=0)
        assert small["seconds"] > 0.1, small  # the delay is really on the path
        reply = await pair.joiner.call("delegate", timeout=150, mb=5, task_timeout=120)
    finally:
        net.remove_loss(net.router_a, 0.02)
        net.remove_delay(net.router_a, helper)
    assert reply["success"] and reply["value"] == 5 * 2**20, reply
    print(f"5 MB over 100 ms + 2 % loss: {reply['seconds']:.1f} s")


async def doctor(
    net: NetBed, ns: str, *args: str, port: int = PLAIN_PORT, env: dict[str, str] | None = None
) -> tuple[int, str]:
    argv = [
        sys.executable, "-m", "swarm_notebook.cli.main", "doctor",
        "--signaling", signaling_url(port), *args,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *net.command(ns, argv), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**child_env(), **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_doctor_says_turn_credentials_refused_and_sees_a_cone_nat(
    bed: tuple[NetBed, Path], tmp_path: Path
) -> None:
    net, _ = bed
    code, out = await doctor(
        net, net.host_a, "--profile", str(tmp_path),
        "--ice-server", STUN, "--ice-server", STUN2, "--ice-server", TURN,
        "--ice-username", f"{int(time.time()) + 600}:someone", "--ice-credential", "wrong",
    )  # fmt: skip
    assert code == 1, out
    assert f"FAIL {TURN}" in out and "TURN credentials refused" in out, out
    assert f"ok   {STUN}: mapped address 198.18.1.2:" in out, out
    assert "cone NAT" in out, out


async def test_doctor_advises_turn_behind_a_symmetric_nat(
    bed: tuple[NetBed, Path], tmp_path: Path
) -> None:
    net, _ = bed
    code, out = await doctor(
        net, net.host_b, "--profile", str(tmp_path), "--ice-server", STUN, "--ice-server", STUN2
    )
    assert code == 1, out
    assert "symmetric NAT: add a TURN server" in out, out


async def test_doctor_checks_the_servers_signaling_issues(
    bed: tuple[NetBed, Path], tmp_path: Path
) -> None:
    net, _ = bed
    code, out = await doctor(net, net.host_b, "--profile", str(tmp_path), port=ISSUING_PORT)
    assert f"issued: {STUN}, {TURN}" in out, out
    assert f"ok   {TURN}: relay allocated at {INET_IP}:" in out, out
    # One issued STUN server is enough for a guess: coturn's OTHER-ADDRESS gives the second.
    assert "symmetric NAT" in out and "links will relay through TURN" in out, out
    assert code == 0, out
