"""A multi-host network in network namespaces: two hosts behind NATs and an "internet".

::

    host-a 10.1.0.2 ── 10.1.0.1 router-a (cone)      198.18.1.2 ─┐
    host-b 10.2.0.2 ── 10.2.0.1 router-b (symmetric) 198.18.2.2 ─┼─ inet 198.18.0.1
    host-c 10.3.0.2 ── 10.3.0.1 router-c (cone)      198.18.3.2 ─┘  (signaling, coturn)

Router A masquerades with endpoint-independent mapping (Linux keeps the source port), a
"cone" NAT; router B masquerades with ``--random-fully``, a symmetric NAT whose mapping
changes with each destination. Both drop unsolicited packets addressed to themselves:
otherwise conntrack gives a peer's ICE check the port a mapping needs. The internet
namespace routes everything it has no route for to a black-hole device (an ``ifb``: no
dummy module here), so coturn's sends
to private addresses fail quietly instead of closing allocations.

Every name carries a per-run prefix; :meth:`NetBed.close` kills what runs inside and
deletes the namespaces, and :func:`leftovers` lists any that survived.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "snbed"
INET_IP = "198.18.0.1"
INET_IP2 = "198.18.0.2"  # coturn's second address: a second STUN answer for NAT guesses
HOST_A_IP = "10.1.0.2"
HOST_B_IP = "10.2.0.2"
HOST_C_IP = "10.3.0.2"
TURN_PORT = 3478
TURNS_PORT = 5349
NFQ_DELAY = str(Path(__file__).with_name("nfq_delay.py"))


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def available() -> str | None:
    """Why the bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "iptables", "turnserver"):
        if _run("which", tool, check=False).returncode != 0:
            return f"{tool} is not installed"
    return None


def leftovers() -> list[str]:
    out = _run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@dataclass
class NetBed:
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{PREFIX}-{self.run_id}-{role}"

    @property
    def inet(self) -> str:
        return self.ns("inet")

    @property
    def host_a(self) -> str:
        return self.ns("ha")

    @property
    def host_b(self) -> str:
        return self.ns("hb")

    @property
    def host_c(self) -> str:
        return self.ns("hc")

    @property
    def router_c(self) -> str:
        return self.ns("rc")

    @property
    def router_a(self) -> str:
        return self.ns("ra")

    @property
    def router_b(self) -> str:
        return self.ns("rb")

    def exec(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *argv, check=check)

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``ns`` (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", ns, *argv]

    # -- building ----------------------------------------------------------------------

    def build(self) -> None:
        for role in ("inet", "ra", "rb", "rc", "ha", "hb", "hc"):
            name = self.ns(role)
            _run("ip", "netns", "add", name)
            self.created.append(name)
            self.exec(name, "ip", "link", "set", "lo", "up")
            # IPv4 only: link-local IPv6 addresses would be offered as host candidates.
            self.exec(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self.exec(self.inet, "ip", "addr", "add", f"{INET_IP}/32", "dev", "lo")
        self.exec(self.inet, "ip", "addr", "add", f"{INET_IP2}/32", "dev", "lo")
        self.exec(self.inet, "ip", "link", "add", "blackhole0", "type", "ifb")
        self.exec(self.inet, "ip", "link", "set", "blackhole0", "up")
        self.exec(self.inet, "ip", "route", "add", "default", "dev", "blackhole0")
        self._router("a", self.router_a, self.host_a, "198.18.1", "10.1.0", symmetric=False)
        self._router("b", self.router_b, self.host_b, "198.18.2", "10.2.0", symmetric=True)
        self._router("c", self.router_c, self.host_c, "198.18.3", "10.3.0", symmetric=False)
        self.exec(self.inet, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _veth(self, ns1: str, if1: str, ns2: str, if2: str) -> None:
        tmp1, tmp2 = f"v{self.run_id}{if1}"[:15], f"v{self.run_id}{if2}"[:15]
        _run("ip", "link", "add", tmp1, "type", "veth", "peer", "name", tmp2)
        _run("ip", "link", "set", tmp1, "netns", ns1)
        _run("ip", "link", "set", tmp2, "netns", ns2)
        self.exec(ns1, "ip", "link", "set", tmp1, "name", if1)
        self.exec(ns2, "ip", "link", "set", tmp2, "name", if2)
        self.exec(ns1, "ip", "link", "set", if1, "up")
        self.exec(ns2, "ip", "link", "set", if2, "up")

    def _router(
        self, tag: str, router: str, host: str, wan: str, lan: str, *, symmetric: bool
    ) -> None:
        self._veth(self.inet, f"to{tag}", router, "wan")
        self._veth(router, "lan", host, "eth0")
        self.exec(self.inet, "ip", "addr", "add", f"{wan}.1/24", "dev", f"to{tag}")
        self.exec(router, "ip", "addr", "add", f"{wan}.2/24", "dev", "wan")
        self.exec(router, "ip", "route", "add", "default", "via", f"{wan}.1")
        self.exec(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        self.exec(host, "ip", "addr", "add", f"{lan}.2/24", "dev", "eth0")
        self.exec(host, "ip", "route", "add", "default", "via", f"{lan}.1")
        self.exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if symmetric else [])
        self.exec(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
        self.exec(
            router, "iptables", "-A", "INPUT", "-i", "wan",
            "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP",
        )  # fmt: skip

    # -- impairments ---------------------------------------------------------------------

    def cut_uplink(self, router: str) -> None:
        """Drop everything the router forwards (both directions)."""
        self.exec(router, "iptables", "-I", "FORWARD", "1", "-j", "DROP")

    def restore_uplink(self, router: str) -> None:
        self.exec(router, "iptables", "-D", "FORWARD", "-j", "DROP")

    def add_delay(self, router: str, delay_ms: float) -> subprocess.Popen[str]:
        """Delay what the router sends up its uplink by ``delay_ms`` (NFQUEUE helper).

        Returns the helper process; :meth:`remove_delay` stops it (and :meth:`close`
        kills it with everything else in the namespace).
        """
        helper = subprocess.Popen(
            self.command(router, [sys.executable, NFQ_DELAY, "--delay-ms", f"{delay_ms}"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert helper.stdout is not None
        if helper.stdout.readline().strip() != "ready":
            helper.kill()
            helper.wait()
            raise RuntimeError("the NFQUEUE delay helper did not start")
        self.exec(router, "iptables", "-A", "FORWARD", *self._delay_rule())
        return helper

    def remove_delay(self, router: str, helper: subprocess.Popen[str]) -> None:
        self.exec(router, "iptables", "-D", "FORWARD", *self._delay_rule(), check=False)
        helper.terminate()
        try:
            helper.wait(5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()

    @staticmethod
    def _delay_rule() -> list[str]:
        # --queue-bypass: should the helper die, packets flow undelayed instead of stopping.
        return ["-o", "wan", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]

    def add_loss(self, router: str, probability: float) -> None:
        self.exec(router, "iptables", "-I", "FORWARD", "1", *self._loss(probability))

    def remove_loss(self, router: str, probability: float) -> None:
        self.exec(router, "iptables", "-D", "FORWARD", *self._loss(probability))

    @staticmethod
    def _loss(probability: float) -> list[str]:
        return [
            "-m", "statistic", "--mode", "random", "--probability", f"{probability}", "-j", "DROP"
        ]  # fmt: skip

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        for name in reversed(self.created):
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _run("ip", "netns", "del", name, check=False)
        self.created.clear()


@contextlib.contextmanager
def netbed() -> Iterator[NetBed]:
    bed = NetBed()
    try:
        bed.build()
        yield bed
    finally:
        bed.close()


def coturn_config(
    directory: Path,
    secret: str,
    *,
    listen: str = INET_IP,
    tls: tuple[Path, Path] | None = None,
) -> Path:
    """A coturn config: REST-API auth with a static secret, UDP and TCP, no CLI.

    With ``tls`` (certificate, key) it also serves TURN over TLS on ``TURNS_PORT``.
    """
    path = directory / "turnserver.conf"
    tls_lines = (
        f"tls-listening-port={TURNS_PORT}\ncert={tls[0]}\npkey={tls[1]}\n"
        if tls is not None
        else "no-tls\n"
    )
    path.write_text(
        textwrap.dedent(
            f"""\
            listening-ip={listen}
            listening-ip={INET_IP2}
            relay-ip={listen}
            listening-port={TURN_PORT}
            min-port=49152
            max-port=49999
            use-auth-secret
            static-auth-secret={secret}
            realm=netbed
            fingerprint
            no-cli
            no-dtls
            no-multicast-peers
            userdb={directory / "turndb"}
            pidfile={directory / "turnserver.pid"}
            log-file={directory / "turnserver.log"}
            simple-log
            no-stdout-log
            """
        )
        + tls_lines
    )
    return path
