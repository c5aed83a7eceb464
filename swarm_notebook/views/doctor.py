"""``doctor``: can this machine reach the swarm, and how do its links run?

Checks, each with advice in plain words when it fails: the signaling server answers (and
its TLS certificate is valid for ``wss://``); every ICE server answers with its
credentials (STUN binding, TURN allocation); the NAT type, guessed from two STUN answers;
and, inside a live swarm, each link's selected candidate pair, round-trip time and bytes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

import swarm_notebook.environment as environment
from swarm_notebook.errors import SignalingError
from swarm_notebook.identity import Identity
from swarm_notebook.signaling.client import SignalingClient, tls_context
from swarm_notebook.transport.ice_config import IceServer, IceSettings, parse_servers
from swarm_notebook.transport.ice_probe import (
    ProbeResult,
    guess_nat,
    local_addresses,
    probe_stun_pair,
    probe_turn,
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    advice: str | None = None


async def check_signaling(url: str, timeout: float = 5.0, ca_file: str | None = None) -> Check:
    """The server accepts a WebSocket and sends its challenge (TLS verified for wss).

    ``ca_file`` (default ``$SWARM_NOTEBOOK_CA_FILE``) trusts a self-signed certificate.
    """
    try:
        context = tls_context(url, ca_file or os.environ.get(environment.CA_FILE) or None)
    except SignalingError as exc:
        return Check("signaling", False, exc.message, "give a readable PEM file")
    try:
        async with (
            aiohttp.ClientSession() as http,
            asyncio.timeout(timeout),
            http.ws_connect(url, ssl=context if context is not None else True) as ws,
        ):
            message = await ws.receive()
    except aiohttp.ClientConnectorCertificateError as exc:
        return Check("signaling", False, f"{url}: TLS certificate not valid: {exc}",
                     "fix the server's certificate (it must match the host name), or trust a"
                     f" self-signed one with --ca-file / ${environment.CA_FILE}")  # fmt: skip
    except (ssl.SSLError, aiohttp.ClientSSLError) as exc:
        return Check("signaling", False, f"{url}: TLS failed: {exc}", "check the wss:// setup")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Check(
            "signaling",
            False,
            f"{url}: not reachable ({type(exc).__name__}: {exc})",
            "is `swarm-notebook signal` running there, and is its port open?",
        )
    if message.type is not aiohttp.WSMsgType.TEXT or '"challenge"' not in str(message.data):
        return Check("signaling", False, f"{url}: answered, but not as a signaling server")
    tls = " (TLS certificate valid)" if url.startswith("wss://") else ""
    return Check("signaling", True, f"{url} answers{tls}")


async def issued_servers(
    url: str, secret: str | None, timeout: float = 10.0, ca_file: str | None = None
) -> tuple[list[dict[str, Any]], Check]:
    """Join a throwaway room to see which ICE servers the signaling server issues."""
    client = SignalingClient(
        url, f"doctor-{secrets.token_hex(4)}", Identity.generate(), secret,
        join_timeout=timeout, ca_file=ca_file,
    )  # fmt: skip
    try:
        await client.start(timeout)
    except SignalingError as exc:
        return [], Check("issued ICE servers", False, f"join refused: {exc.message}",
                         "give the room secret (--secret / $SWARM_NOTEBOOK_SECRET)")  # fmt: skip
    servers = list(client.ice_servers)
    await client.close()
    if not servers:
        return [], Check("issued ICE servers", True, "the signaling server issues none")
    urls = ", ".join(
        str(u) for s in servers for u in ([s["urls"]] if isinstance(s["urls"], str) else s["urls"])
    )
    return servers, Check("issued ICE servers", True, f"issued: {urls}")


def _server_check(result: ProbeResult, server: IceServer) -> Check:
    if result.ok:
        return Check(server.url, True, result.detail)
    if result.reason == "turn-refused":
        advice = (
            "TURN credentials refused: check --ice-username/--ice-credential, or that the"
            " signaling server's --turn-secret equals coturn's static-auth-secret"
        )
    else:
        advice = f"{server.host}:{server.port} does not answer: is the server up and the port open?"
    return Check(server.url, False, result.detail, advice)


async def check_ice(settings: IceSettings, issued: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Probe every server this peer would use; guess the NAT; say what to add."""
    if settings.configured:
        servers, source = list(settings.servers), settings.servers_source
    else:
        servers, source = list(parse_servers(list(issued), "issued")), "the signaling server"
    checks = [Check("ice policy", True, f"{settings.policy} (from {settings.policy_source})")]
    if not servers:
        checks.append(
            Check(
                "ice servers",
                False,
                "none configured or issued",
                "peers on other networks cannot link: run the signaling server with"
                " --ice-server/--turn-url/--turn-secret, or give --ice-server",
            )
        )
        return checks
    checks.append(Check("ice servers", True, f"{len(servers)} from {source}"))
    stuns = [s for s in servers if not s.is_turn]
    turns = [s for s in servers if s.is_turn]
    turn_results = await asyncio.gather(*(probe_turn(s) for s in turns))
    first = second = None
    if stuns:
        first, second = await probe_stun_pair(stuns[0], stuns[1] if len(stuns) > 1 else None)
        checks.append(_server_check(first, stuns[0]))
        if second is not None and len(stuns) > 1:
            checks.append(_server_check(second, stuns[1]))
        for server in stuns[2:]:
            result, _ = await probe_stun_pair(server)
            checks.append(_server_check(result, server))
    checks.extend(_server_check(r, s) for r, s in zip(turn_results, turns, strict=True))
    turn_ok = any(r.ok for r in turn_results)
    if first is None:
        checks.append(Check("nat", True, "no STUN server to guess the NAT type with"))
        return checks
    guess = guess_nat(first, second, local_addresses())
    if guess.kind == "symmetric" and not turn_ok:
        checks.append(Check("nat", False, guess.detail, "symmetric NAT: add a TURN server"))
    elif guess.kind == "symmetric":
        checks.append(Check("nat", True, f"{guess.detail}; links will relay through TURN"))
    else:
        checks.append(Check("nat", True, guess.detail))
    return checks


def link_checks(stats: Mapping[str, Any]) -> list[Check]:
    """Each link of a live coordinator: route, candidate types, server, RTT and bytes."""
    checks = []
    for peer in stats.get("peers") or []:
        name = f"link {str(peer.get('id'))[:16]}"
        if peer.get("state") != "connected":
            checks.append(Check(name, False, f"state {peer.get('state')}",
                                "not linked: see the ICE and NAT checks above"))  # fmt: skip
            continue
        rtt = peer.get("rtt_ms")
        detail = (
            f"{peer.get('route') or '?'} ({peer.get('local_candidate')} -> "
            f"{peer.get('remote_candidate')}) via {peer.get('ice_server') or 'no server'}, "
            f"rtt {'?' if rtt is None else f'{rtt:.1f}'} ms, "
            f"{peer.get('bytes_in', 0)} B in / {peer.get('bytes_out', 0)} B out"
        )
        checks.append(Check(name, True, detail))
    return checks


def render(checks: Sequence[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        if check.advice:
            lines.append(f"     -> {check.advice}")
    return "\n".join(lines)


async def diagnose(
    url: str, secret: str | None, settings: IceSettings, ca_file: str | None = None
) -> list[Check]:
    """Every check that needs no swarm: signaling, issued servers, ICE servers, NAT."""
    checks = [await check_signaling(url, ca_file=ca_file)]
    issued: list[dict[str, Any]] = []
    if checks[0].ok:
        issued, issued_check = await issued_servers(url, secret, ca_file=ca_file)
        checks.append(issued_check)
    checks.extend(await check_ice(settings, issued))
    return checks


async def diagnose_swarm(
    url: str,
    settings: IceSettings,
    servers_in_use: Sequence[IceServer],
    stats: Mapping[str, Any],
    ca_file: str | None = None,
) -> list[Check]:
    """The checks for a joined peer: the servers its mesh uses now, and each link."""
    in_use = IceSettings(
        tuple(servers_in_use), settings.policy, "this swarm", settings.policy_source
    )
    checks = [await check_signaling(url, ca_file=ca_file)]
    checks.extend(await check_ice(in_use, []))
    checks.extend(link_checks(stats))
    return checks
