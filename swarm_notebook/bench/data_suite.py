"""Data movement side by side: the swarm, ipyparallel and Dask push and pull one frame.

Two suites, each measuring ``df50`` (incompressible floats) and ``realistic50`` (see
``data_frames``) pushed to one remote worker and pulled back:

* ``data``: on loopback, through the swarm (signaling server + one worker process,
  ``delegate_task`` with the frame as input and value), ipyparallel (one engine, push and
  pull) and Dask (a scheduler and one worker process: scatter, submit identity, gather),
  side by side in one run; peak RSS above baseline on both ends for ``df50``, and the
  bytes the swarm put on the link for each frame (compression at work). Then
  ``resident20`` for each tool: a df50 frame put once, 20 column sums on it gathered
  (``data_resident``); the put is its own metric. ``--quick`` runs a tenth of the frames,
  one round, and leaves ipyparallel out (its cluster starts cost more than the rest).
* ``data-1gbit``: the swarm and Dask again, across two network namespaces joined by a
  veth pair shaped to 1 Gbit/s with ``tbf`` on both ends (this kernel has no ``netem``):
  the signaling server, the swarm worker and Dask's scheduler and worker in the remote
  namespace, the delegator and Dask's client in the local one. Needs root; full runs only.

The measuring end always runs in its own process (``data_driver``), so its RSS is its own.
Each metric's note says the tool's compression setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import swarm_notebook.environment as environment
from swarm_notebook.bench.data_driver import RESIDENT20
from swarm_notebook.bench.data_frames import DF50_ROWS, REALISTIC50_ROWS
from swarm_notebook.bench.framework import Suite, SuiteContext
from swarm_notebook.errors import BenchError
from swarm_notebook.reasons import Reason

MB = 1e6
DRIVER_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DataBenchConfig:
    """Frame sizes, rounds (batches for resident20), and whether ipyparallel runs."""

    df50_rows: int
    realistic_rows: int
    rounds: int
    ipyparallel: bool = True

    @classmethod
    def full(cls) -> DataBenchConfig:
        return cls(DF50_ROWS, REALISTIC50_ROWS, 3)

    @classmethod
    def quick(cls) -> DataBenchConfig:
        # A tenth of the frames, one round: the path is exercised, not measured. No
        # ipyparallel: each of its three cluster starts takes ~20 s, and the ipyparallel
        # suite already proves it starts.
        return cls(DF50_ROWS // 10, REALISTIC50_ROWS // 10, 1, ipyparallel=False)


@dataclass(frozen=True)
class Place:
    """Where processes run: a network namespace (``None``: this one) and its address."""

    netns: str | None
    host: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, *argv]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[environment.ICE_HOSTS] = self.host
        # The children run this checkout's code, whichever way the bench was started.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Remote:
    """The far end: signaling, one swarm worker, a Dask scheduler and one Dask worker."""

    signaling_url: str
    swarm_worker_pid: int
    dask_address: str
    dask_worker_pid: int


async def _start(place: Place, argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *place.argv(argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=place.env(),
    )


async def _line_with(proc: asyncio.subprocess.Process, marker: bytes) -> bytes:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line:
            raise BenchError(Reason.BENCH_FAILED, f"process exited before saying {marker!r}")
        if marker in line:
            return line


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


@contextlib.asynccontextmanager
async def remote_end(place: Place, home: str) -> AsyncIterator[Remote]:
    """Start the far end's processes in ``place``; stop them all on exit."""
    py = sys.executable
    procs: list[asyncio.subprocess.Process] = []
    drains: list[asyncio.Task[None]] = []
    try:
        sig_port, dask_port = _free_port(), _free_port()
        signal = await _start(
            place,
            [
                py,
                "-m",
                "swarm_notebook.cli.main",
                "signal",
                "--host",
                place.host,
                "--port",
                str(sig_port),
            ],
        )
        procs.append(signal)
        line = await _line_with(signal, b"listening on")
        url = line.decode().rsplit(" ", 1)[1].strip()
        worker = await _start(
            place,
            [
                py,
                "-m",
                "swarm_notebook.cli.main",
                "worker",
                "--signaling",
                url,
                "--room",
                "data",
                "--profile",
                os.path.join(home, "worker"),
                "--caps",
                "python-execution",
                "--concurrency",
                "1",
                "--name",
                "data-worker",
            ],
        )
        procs.append(worker)
        await _line_with(worker, b"READY")
        dask_address = f"tcp://{place.host}:{dask_port}"
        scheduler = await _start(
            place,
            [
                py,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                place.host,
                "--port",
                str(dask_port),
                "--no-dashboard",
            ],
        )
        procs.append(scheduler)
        dask_worker = await _start(
            place,
            [
                py,
                "-m",
                "distributed.cli.dask_worker",
                dask_address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                place.host,
            ],
        )
        procs.append(dask_worker)
        drains = [asyncio.ensure_future(_drain(p)) for p in procs]
        yield Remote(url, worker.pid, dask_address, dask_worker.pid)
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)


async def drive(
    place: Place, tool: str, kind: str, rows: int, rounds: int, address: str, pid: int | None
) -> dict[str, Any]:
    """Run one ``data_driver`` measurement in ``place``; its JSON reply."""
    argv = [
        sys.executable,
        "-m",
        "swarm_notebook.bench.data_driver",
        tool,
        kind,
        str(rows),
        str(rounds),
        address,
    ]
    if pid is not None:
        argv.append(str(pid))
    proc = await asyncio.create_subprocess_exec(
        *place.argv(argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=place.env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DRIVER_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(
            Reason.BENCH_FAILED, f"{tool} {kind}: no answer in {DRIVER_TIMEOUT_S} s"
        ) from None
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if not lines:
        tail = err.decode(errors="replace")[-800:]
        raise BenchError(Reason.BENCH_FAILED, f"{tool} {kind}: driver said nothing: {tail}")
    reply: dict[str, Any] = json.loads(lines[-1])
    if "error" in reply:
        raise BenchError(Reason.BENCH_FAILED, f"{tool} {kind}: {reply['error']}")
    return reply


def _record(ctx: SuiteContext, name: str, reply: dict[str, Any]) -> None:
    ctx.record(name, reply["samples"], "s", note=str(reply.get("note", "")))


def _record_resident(ctx: SuiteContext, prefix: str, tool: str, reply: dict[str, Any]) -> None:
    _record(ctx, f"{prefix}_resident20_{tool}_s", reply)
    ctx.record(
        f"{prefix}_resident20_put_{tool}_s",
        reply["put"],
        "s",
        note="the one-off put / scatter / push of the frame, left out of resident20",
    )


def _record_rss(
    ctx: SuiteContext, prefix: str, tool: str, ends: tuple[str, str], reply: dict[str, Any]
) -> None:
    for end, key in zip(ends, ("rss_local", "rss_remote"), strict=True):
        ctx.record(
            f"{prefix}_df50_{tool}rss_{end}_MB",
            [b / MB for b in reply[key]],
            "MB",
            note="peak RSS above the process tree's baseline during push + pull",
        )


async def measure(
    ctx: SuiteContext,
    cfg: DataBenchConfig,
    local: Place,
    far: Place,
    prefix: str,
    *,
    ipyparallel: bool,
    rss: bool,
    resident: bool = False,
) -> None:
    """df50 and realistic50 through every tool; metrics named ``<prefix>_<frame>_<tool>_s``.

    With ``resident``, also ``<prefix>_resident20_<tool>_s``: 20 tasks on a df50 frame
    put once (``data_resident``), and the put's own time as ``..._resident20_put_<tool>_s``.
    """
    import tempfile

    frames = (("df50", cfg.df50_rows), ("realistic50", cfg.realistic_rows))
    with tempfile.TemporaryDirectory(prefix="swarm-data-") as home:
        os.chmod(home, 0o755)  # the far end may run as another user inside its namespace
        async with remote_end(far, home) as remote:
            for kind, rows in frames:
                with ctx.task(f"{kind}: swarm", cfg.rounds):
                    swarm = await drive(
                        local,
                        "swarm",
                        kind,
                        rows,
                        cfg.rounds,
                        remote.signaling_url,
                        remote.swarm_worker_pid,
                    )
                _record(ctx, f"{prefix}_{kind}_swarm_s", swarm)
                frame_mb = swarm["frame_bytes"] / MB
                ctx.record(f"{prefix}_{kind}_frame_MB", [frame_mb], "MB")
                ctx.record(
                    f"{prefix}_{kind}_swarm_link_MB",
                    [b / MB for b in swarm["link"]],
                    "MB",
                    note="bytes on the link, both ways, for one push + pull",
                )
                with ctx.task(f"{kind}: dask", cfg.rounds):
                    dask = await drive(
                        local,
                        "dask",
                        kind,
                        rows,
                        cfg.rounds,
                        remote.dask_address,
                        remote.dask_worker_pid,
                    )
                _record(ctx, f"{prefix}_{kind}_dask_s", dask)
                if rss and kind == "df50":
                    _record_rss(ctx, prefix, "", ("delegator", "worker"), swarm)
                    _record_rss(ctx, prefix, "dask_", ("client", "worker"), dask)
            if resident:
                for tool, address, pid in (
                    ("swarm", remote.signaling_url, remote.swarm_worker_pid),
                    ("dask", remote.dask_address, remote.dask_worker_pid),
                ):
                    with ctx.task(f"{RESIDENT20}: {tool}", cfg.rounds):
                        reply = await drive(
                            local, tool, RESIDENT20, cfg.df50_rows, cfg.rounds, address, pid
                        )
                    _record_resident(ctx, prefix, tool, reply)
        if ipyparallel:
            for kind, rows in frames:
                with ctx.task(f"{kind}: ipyparallel", cfg.rounds):
                    reply = await drive(local, "ipyparallel", kind, rows, cfg.rounds, "-", None)
                _record(ctx, f"{prefix}_{kind}_ipyparallel_s", reply)
                if rss and kind == "df50":
                    _record_rss(ctx, prefix, "ipyparallel_", ("client", "engine"), reply)
            if resident:
                with ctx.task(f"{RESIDENT20}: ipyparallel", cfg.rounds):
                    reply = await drive(
                        local, "ipyparallel", RESIDENT20, cfg.df50_rows, cfg.rounds, "-", None
                    )
                _record_resident(ctx, prefix, "ipyparallel", reply)


# ------------------------------------------------------------------- the shaped link


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


LOCAL_IP = "10.77.0.1"
REMOTE_IP = "10.77.0.2"


@contextlib.contextmanager
def shaped_link(rate: str = "1gbit") -> Iterator[tuple[Place, Place]]:
    """Two namespaces joined by a veth pair, each end shaped with ``tbf`` to ``rate``."""
    if os.geteuid() != 0:
        raise BenchError(Reason.BENCH_FAILED, "data-1gbit needs root (ip netns, tc)")
    run = secrets.token_hex(3)
    local_ns, remote_ns = f"snbench-{run}-l", f"snbench-{run}-r"
    local_dev, remote_dev = f"sndl{run}", f"sndr{run}"
    made: list[str] = []
    try:
        for ns in (local_ns, remote_ns):
            _ip("ip", "netns", "add", ns)
            made.append(ns)
            _ip("ip", "-n", ns, "link", "set", "lo", "up")
            _ip("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _ip("ip", "link", "add", local_dev, "type", "veth", "peer", "name", remote_dev)
        for ns, dev, addr in ((local_ns, local_dev, LOCAL_IP), (remote_ns, remote_dev, REMOTE_IP)):
            _ip("ip", "link", "set", dev, "netns", ns)
            _ip("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("ip", "-n", ns, "link", "set", dev, "up")
            _ip(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "512kb",
                "latency",
                "20ms",
            )
        yield Place(local_ns, LOCAL_IP), Place(remote_ns, REMOTE_IP)
    finally:
        for ns in made:
            _ip("ip", "netns", "del", ns, check=False)


def data_suites(config: DataBenchConfig | None = None) -> list[Suite]:
    """``data`` (loopback, three tools, RSS) and ``data-1gbit`` (shaped link, full runs)."""

    def pick(ctx: SuiteContext) -> DataBenchConfig:
        return config or (DataBenchConfig.quick() if ctx.quick else DataBenchConfig.full())

    async def data(ctx: SuiteContext) -> None:
        here = Place(None, "127.0.0.1")
        cfg = pick(ctx)
        await measure(
            ctx, cfg, here, here, "data", ipyparallel=cfg.ipyparallel, rss=True, resident=True
        )

    async def data_1gbit(ctx: SuiteContext) -> None:
        with shaped_link() as (local, far):
            await measure(ctx, pick(ctx), local, far, "data1g", ipyparallel=False, rss=False)

    return [
        Suite(
            "data",
            data,
            timeout_s=900,
            quick_timeout_s=150,
            description=(
                "df50 / realistic50 push + pull, resident20: swarm, Dask, ipyparallel; RSS"
            ),
        ),
        Suite(
            "data-1gbit",
            data_1gbit,
            timeout_s=900,
            quick_timeout_s=150,
            description="df50 / realistic50 over a tbf-shaped 1 Gbit/s veth: swarm, Dask",
            full_only=True,
        ),
    ]
