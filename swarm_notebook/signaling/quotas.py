"""Per-address quotas of the signaling server: what one remote address may hold at once.

Keys cost nothing, so the server's global limits (peers per room, connections) were a lever
for one client to deny service to everyone else. These quotas bound what a single remote
address can take: open sockets, sockets that have not joined yet, rooms it created, peers
it holds in one room, and room-secret guesses (a growing lockout). Every refusal carries a
reason and is attributed to its address in a bounded table of offenders for ``/stats``.

IPv6 clients are grouped by their /64 prefix (one host usually owns the whole prefix);
IPv4-mapped IPv6 addresses count as the IPv4 address.

All methods are synchronous: a check and the bookkeeping that follows it cannot be
interleaved with another socket's on the event loop.

>>> quotas = AddressQuotas(QuotaLimits(connections_per_address=1), clock=lambda: 0.0)
>>> quotas.admit("10.0.0.1") is None, quotas.admit("10.0.0.1").reason
(True, <Reason.TOO_MANY_CONNECTIONS_FROM_ADDRESS: 'too-many-connections-from-address'>)
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from swarm_notebook.reasons import Reason

# How many addresses /stats lists in each table.
TOP_N = 10


@dataclass(frozen=True)
class QuotaLimits:
    """Per-address bounds; defaults fit a team on one machine, not a flood.

    A developer running ``swarm-notebook up`` with a handful of workers and notebooks holds
    one socket per peer, all from one address; these defaults leave ample room for that
    while keeping one address from filling a room (``peers_per_room_per_address`` is half
    of the default ``peers_per_room``) or the server.
    """

    connections_per_address: int = 128
    # Sockets that connected but have not joined yet (each lives at most ``join_timeout``).
    pending_per_address: int = 32
    rooms_per_address: int = 32
    peers_per_room_per_address: int = 32
    # Wrong room-secret proofs in a row before the address is locked out.
    secret_failures: int = 5
    lockout_base: float = 2.0
    lockout_max: float = 600.0
    # Addresses remembered for lockouts and offender counts (bounded memory under a
    # flood from many addresses; the least recently seen is forgotten first).
    tracked_addresses: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "connections_per_address",
            "pending_per_address",
            "rooms_per_address",
            "peers_per_room_per_address",
            "secret_failures",
            "tracked_addresses",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lockout_base <= self.lockout_max:
            raise ValueError("lockout_base must be > 0 and <= lockout_max")


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str


def address_key(remote: str | None) -> str:
    """The quota key of a remote address (IPv6 by /64, IPv4-mapped as IPv4).

    >>> address_key("::ffff:10.1.2.3"), address_key("2001:db8::1"), address_key(None)
    ('10.1.2.3', '2001:db8::/64', 'unknown')
    """
    if not remote:
        return "unknown"
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Lockout:
    failures: int = 0  # wrong proofs since the last lockout
    lockouts: int = 0  # lockouts so far: the next one lasts base * 2**lockouts
    until: float = 0.0
    last_failure: float = 0.0


class SecretLockout:
    """Room-secret guesses per address: after ``secret_failures`` wrong proofs the address is
    locked out for ``lockout_base`` seconds, doubling with every further lockout up to
    ``lockout_max``. An address quiet for ``lockout_max`` seconds is forgotten.

    >>> now = [0.0]
    >>> guard = SecretLockout(QuotaLimits(secret_failures=2, lockout_base=1.0), lambda: now[0])
    >>> guard.failed("a"), guard.failed("a"), guard.remaining("a")
    (0.0, 1.0, 1.0)
    >>> now[0] = 1.5; guard.failed("a"), guard.failed("a")
    (0.0, 2.0)
    """

    def __init__(self, limits: QuotaLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._states: OrderedDict[str, _Lockout] = OrderedDict()
        self.failures_total = 0
        self.lockouts_total = 0

    def remaining(self, address: str) -> float:
        """Seconds ``address`` stays locked out (0.0 when it may try)."""
        state = self._states.get(address)
        if state is None:
            return 0.0
        return max(0.0, state.until - self._clock())

    def failed(self, address: str) -> float:
        """Record a wrong proof; returns the lockout it started, in seconds (0.0 if none)."""
        now = self._clock()
        self._forget_quiet(now)
        state = self._states.pop(address, None) or _Lockout()
        self._states[address] = state  # most recently seen last
        while len(self._states) > self._limits.tracked_addresses:
            self._states.popitem(last=False)
        self.failures_total += 1
        state.failures += 1
        state.last_failure = now
        if state.failures < self._limits.secret_failures:
            return 0.0
        duration = min(self._limits.lockout_max, self._limits.lockout_base * 2**state.lockouts)
        state.failures = 0
        state.lockouts += 1
        state.until = now + duration
        self.lockouts_total += 1
        return duration

    def succeeded(self, address: str) -> None:
        """A correct proof ends the streak of failures (not a running lockout)."""
        state = self._states.get(address)
        if state is not None:
            state.failures = 0

    def stats(self) -> dict[str, Any]:
        now = self._clock()
        locked = sorted(
            ((a, s) for a, s in self._states.items() if s.until > now),
            key=lambda item: item[1].until,
            reverse=True,
        )
        return {
            "secret_failures_total": self.failures_total,
            "lockouts_total": self.lockouts_total,
            "locked_out_now": len(locked),
            "locked_out": [
                {
                    "address": address,
                    "remaining_s": round(state.until - now, 3),
                    "lockouts": state.lockouts,
                }
                for address, state in locked[:TOP_N]
            ],
        }

    def _forget_quiet(self, now: float) -> None:
        horizon = now - self._limits.lockout_max
        while self._states:
            address, state = next(iter(self._states.items()))
            if state.last_failure > horizon or state.until > now:
                return
            del self._states[address]


class Offenders:
    """Refusals by address and reason, for the top offenders in ``/stats``; bounded."""

    def __init__(self, tracked: int) -> None:
        self._tracked = tracked
        self._by_address: dict[str, Counter[str]] = {}

    def record(self, address: str, reason: str) -> None:
        counts = self._by_address.get(address)
        if counts is None:
            if len(self._by_address) >= self._tracked:
                # Forget the smallest offender so a flood from many addresses stays bounded.
                smallest = min(self._by_address, key=lambda a: self._by_address[a].total())
                del self._by_address[smallest]
            counts = self._by_address[address] = Counter()
        counts[reason] += 1

    def top(self, n: int = TOP_N) -> list[dict[str, Any]]:
        ranked = sorted(self._by_address.items(), key=lambda item: -item[1].total())
        return [
            {"address": address, "refusals": counts.total(), "reasons": dict(counts)}
            for address, counts in ranked[:n]
        ]


class AddressQuotas:
    """Live sockets, pending sockets and rooms created, per address.

    The server calls ``admit`` for every new socket and ``release`` when it ends,
    ``joined`` once a socket has joined, and ``room_created`` / ``room_removed`` as rooms
    come and go. Peers per room per address are counted by the caller (it holds the room).
    """

    def __init__(
        self, limits: QuotaLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or QuotaLimits()
        self.secrets = SecretLockout(self.limits, clock)
        self.offenders = Offenders(self.limits.tracked_addresses)
        self._connections: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._rooms_by_address: Counter[str] = Counter()
        self._room_creator: dict[str, str] = {}

    def admit(self, address: str) -> Refusal | None:
        """Count a new socket from ``address``, or say why it may not have one."""
        limits = self.limits
        if self._connections[address] >= limits.connections_per_address:
            return Refusal(
                Reason.TOO_MANY_CONNECTIONS_FROM_ADDRESS,
                f"{address} already holds {limits.connections_per_address} connections",
            )
        if self._pending[address] >= limits.pending_per_address:
            return Refusal(
                Reason.TOO_MANY_PENDING,
                f"{address} already has {limits.pending_per_address} sockets that have not"
                " joined yet",
            )
        self._connections[address] += 1
        self._pending[address] += 1
        return None

    def joined(self, address: str) -> None:
        _decrement(self._pending, address)

    def release(self, address: str, *, joined: bool) -> None:
        """An admitted socket ended (``joined``: whether ``joined`` was called for it)."""
        _decrement(self._connections, address)
        if not joined:
            _decrement(self._pending, address)

    def room_refusal(self, address: str, *, creating: bool, peers_in_room: int) -> Refusal | None:
        """Why ``address`` may not add a peer to a room now (``peers_in_room``: its own)."""
        limits = self.limits
        if creating and self._rooms_by_address[address] >= limits.rooms_per_address:
            return Refusal(
                Reason.TOO_MANY_ROOMS_FROM_ADDRESS,
                f"{address} already created {limits.rooms_per_address} rooms that are open",
            )
        if peers_in_room >= limits.peers_per_room_per_address:
            return Refusal(
                Reason.TOO_MANY_PEERS_FROM_ADDRESS,
                f"{address} already holds {limits.peers_per_room_per_address} peers in this room",
            )
        return None

    def room_created(self, room: str, address: str) -> None:
        self._room_creator[room] = address
        self._rooms_by_address[address] += 1

    def room_removed(self, room: str) -> None:
        address = self._room_creator.pop(room, None)
        if address is not None:
            _decrement(self._rooms_by_address, address)

    def stats(self) -> dict[str, Any]:
        return {
            "limits": asdict(self.limits),
            "addresses_connected": len(self._connections),
            "top_connections": _top(self._connections),
            "top_pending": _top(self._pending),
            "top_rooms_created": _top(self._rooms_by_address),
            "top_offenders": self.offenders.top(),
            **self.secrets.stats(),
        }


def _decrement(counter: Counter[str], key: str) -> None:
    # Zero entries are removed so the tables only ever hold addresses with something live.
    if counter[key] <= 1:
        counter.pop(key, None)
    else:
        counter[key] -= 1


def _top(counter: Counter[str]) -> list[dict[str, Any]]:
    return [{"address": a, "count": n} for a, n in counter.most_common(TOP_N)]
