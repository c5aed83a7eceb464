"""Probing STUN and TURN servers: reachable, credentials accepted, and what NAT we are behind.

A STUN probe sends a Binding request and reads the mapped address; a TURN probe makes (and
drops) an allocation with the credentials, using aioice's TURN client. Two STUN answers
to one local socket from two destinations tell the NAT's mapping behaviour: the same
mapped address for both is an endpoint-independent ("cone") mapping, where STUN is enough;
two different ones is a symmetric NAT, where only TURN gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass

from aioice import stun
from aioice.turn import create_turn_endpoint

from swarm_notebook.reasons import Reason
from swarm_notebook.transport.ice_config import IceServer

Address = tuple[str, int]
STUN_TIMEOUT_S = 3.0
TURN_TIMEOUT_S = 6.0


@dataclass(frozen=True)
class ProbeResult:
    """One server's answer (or why there was none)."""

    url: str
    ok: bool
    detail: str
    reason: Reason | None = None
    mapped: Address | None = None
    relayed: Address | None = None
    other: Address | None = None  # RFC 5780 OTHER-ADDRESS, a second place to ask
    rtt_ms: float | None = None


@dataclass(frozen=True)
class NatGuess:
    kind: str  # "none", "endpoint-independent", "symmetric", "unknown"
    detail: str


class _Binding(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiters: dict[bytes, asyncio.Future[stun.Message]] = {}

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return
        waiter = self.waiters.get(message.transaction_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)


async def _resolve(host: str, port: int) -> Address:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    address = infos[0][4]
    return str(address[0]), int(address[1])


async def _binding(
    transport: asyncio.DatagramTransport, protocol: _Binding, addr: Address, timeout: float
) -> tuple[stun.Message, float]:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    waiter: asyncio.Future[stun.Message] = asyncio.get_running_loop().create_future()
    protocol.waiters[request.transaction_id] = waiter
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            delay = 0.25
            while True:  # retransmit, as RFC 5389 asks of UDP clients
                transport.sendto(bytes(request), addr)
                with contextlib.suppress(TimeoutError):
                    reply = await asyncio.wait_for(asyncio.shield(waiter), delay)
                    return reply, (time.perf_counter() - started) * 1000.0
                delay = min(delay * 2, 1.0)
    finally:
        protocol.waiters.pop(request.transaction_id, None)
        waiter.cancel()


async def probe_stun_pair(
    first: IceServer, second: IceServer | None = None, timeout: float = STUN_TIMEOUT_S
) -> tuple[ProbeResult, ProbeResult | None]:
    """Binding requests from one local socket to ``first`` and then ``second``.

    Without ``second``, the first server's OTHER-ADDRESS (if it sent one) is asked.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _Binding, local_addr=("0.0.0.0", 0), family=socket.AF_INET
    )
    try:
        result = await _probe_one(transport, protocol, first, None, timeout)
        target_url, target = None, None
        if second is not None:
            target_url = second.url
            with contextlib.suppress(OSError):
                target = await _resolve(second.host, second.port)
        elif result.other is not None:
            target_url, target = f"stun:{result.other[0]}:{result.other[1]}", result.other
        if target_url is None or target is None:
            return result, None
        other = await _probe_one(transport, protocol, IceServer(target_url), target, timeout)
        return result, other
    finally:
        transport.close()


async def _probe_one(
    transport: asyncio.DatagramTransport,
    protocol: _Binding,
    server: IceServer,
    addr: Address | None,
    timeout: float,
) -> ProbeResult:
    try:
        target = addr or await _resolve(server.host, server.port)
    except OSError as exc:
        return ProbeResult(server.url, False, f"cannot resolve {server.host}: {exc}",
                           Reason.ICE_UNREACHABLE)  # fmt: skip
    try:
        reply, rtt = await _binding(transport, protocol, target, timeout)
    except TimeoutError:
        return ProbeResult(
            server.url, False, f"no STUN answer within {timeout:g} s", Reason.ICE_UNREACHABLE
        )
    mapped = reply.attributes.get("XOR-MAPPED-ADDRESS") or reply.attributes.get("MAPPED-ADDRESS")
    if mapped is None:
        return ProbeResult(server.url, False, "answer without a mapped address",
                           Reason.ICE_UNREACHABLE)  # fmt: skip
    other = reply.attributes.get("OTHER-ADDRESS")
    return ProbeResult(
        server.url,
        True,
        f"mapped address {mapped[0]}:{mapped[1]} ({rtt:.1f} ms)",
        mapped=(str(mapped[0]), int(mapped[1])),
        other=(str(other[0]), int(other[1])) if other else None,
        rtt_ms=rtt,
    )


async def probe_turn(server: IceServer, timeout: float = TURN_TIMEOUT_S) -> ProbeResult:
    """Allocate a relay with the server's credentials, then release it."""
    ssl_context = server.scheme == "turns"
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            turn_transport, _ = await create_turn_endpoint(
                asyncio.DatagramProtocol,
                server_addr=(server.host, server.port),
                username=server.username,
                password=server.credential,
                ssl=ssl_context,
                transport=server.transport,
            )
    except stun.TransactionFailed as exc:
        code = exc.response.error_code
        if code in (401, 403, 437, 441):
            return ProbeResult(
                server.url, False, f"TURN credentials refused ({exc})", Reason.TURN_REFUSED
            )
        return ProbeResult(server.url, False, f"TURN error: {exc}", Reason.ICE_UNREACHABLE)
    except (TimeoutError, stun.TransactionTimeout):
        return ProbeResult(
            server.url, False, f"no TURN answer within {timeout:g} s", Reason.ICE_UNREACHABLE
        )
    except (OSError, ConnectionError) as exc:
        return ProbeResult(server.url, False, f"cannot reach: {exc}", Reason.ICE_UNREACHABLE)
    rtt = (time.perf_counter() - started) * 1000.0
    relayed = turn_transport.get_extra_info("sockname")
    turn_transport.close()
    return ProbeResult(
        server.url,
        True,
        f"relay allocated at {relayed[0]}:{relayed[1]} ({rtt:.1f} ms)",
        relayed=(str(relayed[0]), int(relayed[1])),
        rtt_ms=rtt,
    )


def guess_nat(first: ProbeResult, second: ProbeResult | None, local_ips: set[str]) -> NatGuess:
    """What two STUN answers to one socket say about the NAT in front of us."""
    if not first.ok or first.mapped is None:
        return NatGuess("unknown", "no STUN answer, so no guess")
    if first.mapped[0] in local_ips:
        return NatGuess("none", f"no NAT: the servers see our own address {first.mapped[0]}")
    if second is None or not second.ok or second.mapped is None:
        return NatGuess(
            "unknown",
            "one STUN answer only: give a second STUN server (or one that sends OTHER-ADDRESS)"
            " to tell a cone NAT from a symmetric one",
        )
    if first.mapped == second.mapped:
        return NatGuess(
            "endpoint-independent",
            f"cone NAT: the same mapping {first.mapped[0]}:{first.mapped[1]} for both servers",
        )
    return NatGuess(
        "symmetric",
        f"symmetric NAT: mapped {first.mapped[1]} for one server and {second.mapped[1]} for"
        " the other",
    )


def local_addresses() -> set[str]:
    """This host's IPv4 addresses (to tell 'no NAT' from a NAT)."""
    import aioice.ice

    return set(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False))
