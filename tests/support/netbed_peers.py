"""Peers and servers on the network test bed: the shipped CLI and ``join()`` in namespaces.

Shared by ``tests/test_netbed.py`` and the ``netbed_bench`` script.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from swarm_notebook.signaling.turn_credentials import turn_password
from tests.support import netbed
from tests.support.certs import self_signed_cert
from tests.support.netbed import INET_IP, INET_IP2, TURN_PORT, TURNS_PORT, NetBed
from tests.support.procs import REPO, PeerProcess

TURN_SECRET = "netbed-static-auth-secret"
STUN = f"stun:{INET_IP}:{TURN_PORT}"
STUN2 = f"stun:{INET_IP2}:{TURN_PORT}"
DEAD_STUN = f"stun:{INET_IP}:3999"  # nothing listens there
TURN_TCP = f"turn:{INET_IP}:{TURN_PORT}?transport=tcp"
TURN = f"turn:{INET_IP}:{TURN_PORT}"
TURNS = f"turns:{INET_IP}:{TURNS_PORT}?transport=tcp"  # coturn's certificate: see running_bed
PLAIN_PORT, ISSUING_PORT = 8765, 8766
LINK_TIMEOUT = 30.0


def child_env() -> dict[str, str]:
    # The hosts have real (namespace) interfaces: no loopback restriction, no inherited ICE.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SWARM_NOTEBOOK_ICE") and k != "SWARM_NOTEBOOK_SECRET"
    }
    return {**env, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}


def rest_credentials(name: str, ttl: int = 3600, secret: str = TURN_SECRET) -> tuple[str, str]:
    username = f"{int(time.time()) + ttl}:{name}"
    return username, turn_password(secret, username)


def turn_entry(name: str, secret: str = TURN_SECRET) -> dict[str, Any]:
    username, credential = rest_credentials(name, secret=secret)
    return {"urls": TURN, "username": username, "credential": credential}


class Background:
    """A long-running process inside a namespace, killed (by pid) at teardown."""

    def __init__(self, argv: list[str], log: Path, ready: str | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log.open("wb"), env=child_env(), text=True
        )
        if ready is not None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert ready in line, f"{argv[4:7]} did not start: {line!r}\n{log.read_text()[-2000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def signaling_url(port: int = PLAIN_PORT) -> str:
    return f"ws://{INET_IP}:{port}/ws"


class NsWorker:
    """``swarm-notebook worker`` run with ``ip netns exec`` in a host namespace."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.peer_id = ""
        self.stderr = b""

    @classmethod
    async def start(
        cls, net: NetBed, ns: str, room: str, profile: Path, *args: str, **kw: Any
    ) -> NsWorker:
        env = {**child_env(), **kw.pop("env", {})}
        port = kw.pop("port", PLAIN_PORT)
        argv = [
            sys.executable, "-m", "swarm_notebook.cli.main", "worker",
            "--signaling", signaling_url(port), "--room", room, "--profile", str(profile),
            "--caps", "python-execution", "--max-input-mb", "16", *args,
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *net.command(ns, argv), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        worker = cls(proc)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("READY"):
            await worker.stop()
            raise AssertionError(f"worker did not start: {line!r} {worker.stderr[-3000:]!r}")
        worker.peer_id = dict(p.split("=", 1) for p in line.split()[1:])["peer_id"]
        return worker

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()


async def start_joiner(
    net: NetBed, ns: str, room: str, profile: Path, port: int = PLAIN_PORT, **join_kwargs: Any
) -> PeerProcess:
    argv = [
        sys.executable, os.path.join(REPO, "tests", "support", "netbed_join.py"),
        "--signaling", signaling_url(port), "--room", room, "--profile", str(profile),
        "--join-kwargs", json.dumps(join_kwargs),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *net.command(ns, argv), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(), limit=16 * 2**20,
    )  # fmt: skip
    peer = PeerProcess(proc, f"joiner@{ns}")
    await peer.wait_for(lambda e: e.get("event") in ("ready", "join_failed"), 60)
    return peer


class Pair:
    """A worker and a joiner in one room; both stopped at the end of the test."""

    def __init__(self) -> None:
        self.worker: NsWorker | None = None
        self.joiner: PeerProcess | None = None

    async def link(self, timeout: float = LINK_TIMEOUT) -> dict[str, Any]:
        """Wait for the worker's link on the joiner's side; returns its ``peers`` row.

        Also waits for the worker's capabilities (its card follows the link), so a
        delegation right after finds it capable.
        """
        assert self.worker is not None and self.joiner is not None
        await self.joiner.wait_for(
            lambda e: e.get("event") == "peer_up" and e.get("peer") == self.worker.peer_id,  # type: ignore[union-attr]
            timeout,
        )
        deadline = time.monotonic() + 10
        while True:
            reply = await self.joiner.call("peers")
            row = next(p for p in reply["peers"] if p["id"] == self.worker.peer_id)
            if (row.get("route") and row.get("capabilities")) or time.monotonic() > deadline:
                return row
            await asyncio.sleep(0.2)  # route and card are read by polling get_stats()

    async def close(self) -> None:
        if self.joiner is not None:
            await self.joiner.stop()
        if self.worker is not None:
            await self.worker.stop()


@contextmanager
def running_bed(work: Path) -> Iterator[NetBed]:
    """The namespaces, coturn and two signaling servers (one issuing TURN credentials)."""
    started: list[Background] = []
    with netbed.netbed() as net:
        try:
            # TURN over TLS needs a certificate peers trust: one made for coturn's address,
            # trusted by a peer through SSL_CERT_FILE (turns_trust()).
            tls = self_signed_cert(work, "coturn", dns=(), ips=(INET_IP,))
            conf = netbed.coturn_config(work, TURN_SECRET, tls=tls)
            started.append(
                Background(net.command(net.inet, ["turnserver", "-c", str(conf)]), work / "t.log")
            )
            signal = [sys.executable, "-m", "swarm_notebook.cli.main", "signal", "--host", INET_IP]
            started.append(
                Background(
                    net.command(net.inet, [*signal, "--port", str(PLAIN_PORT)]),
                    work / "signal-plain.log",
                    ready="listening",
                )
            )
            issuing = [
                *signal, "--port", str(ISSUING_PORT), "--ice-server", STUN,
                "--turn-url", TURN, "--turn-secret", TURN_SECRET, "--turn-ttl", "600",
            ]  # fmt: skip
            started.append(
                Background(
                    net.command(net.inet, issuing), work / "signal-issuing.log", ready="listening"
                )
            )
            yield net
        finally:
            for proc in reversed(started):
                proc.stop()
