"""How fast bytes crossed this peer's links: a bounded history of per-second rates.

The transport only keeps running totals; the dashboard's sparkline needs rates, so the
coordinator reads the totals once a second and this history turns them into rates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

# The dashboard's transfer-rate sparkline: one sample a second, five minutes kept.
SAMPLE_INTERVAL_S = 1.0
SAMPLES_KEPT = 300


def byte_totals(stats: Mapping[str, object]) -> tuple[int, int]:
    """(bytes in, bytes out) from a transport's ``stats()``; 0 where it does not count.

    >>> byte_totals({"bytes_in": 10, "bytes_out": 4}), byte_totals({})
    ((10, 4), (0, 0))
    """
    bytes_in, bytes_out = stats.get("bytes_in"), stats.get("bytes_out")
    return (
        bytes_in if isinstance(bytes_in, int) else 0,
        bytes_out if isinstance(bytes_out, int) else 0,
    )


@dataclass(frozen=True)
class TransferSample:
    """Bytes per second in and out over the interval that ended at ``timestamp``."""

    timestamp: float
    in_rate: float
    out_rate: float


class TransferHistory:
    """The last ``limit`` rate samples computed from successive byte totals.

    >>> history = TransferHistory(limit=3)
    >>> history.record(10.0, 0, 0)  # the first reading only sets the baseline
    >>> history.record(11.0, 2_000, 500)
    >>> history.samples()
    [TransferSample(timestamp=11.0, in_rate=2000.0, out_rate=500.0)]
    """

    def __init__(self, limit: int = SAMPLES_KEPT) -> None:
        self._samples: deque[TransferSample] = deque(maxlen=limit)
        self._last: tuple[float, int, int] | None = None

    def record(self, timestamp: float, bytes_in: int, bytes_out: int) -> None:
        """Add the totals read at ``timestamp``; the rate covers the time since the last."""
        last, self._last = self._last, (timestamp, bytes_in, bytes_out)
        if last is None:
            return
        elapsed = timestamp - last[0]
        if elapsed <= 0:
            return  # a clock step backwards: no honest rate for this interval
        # Totals only shrink when the transport was replaced (rejoin): count from zero then.
        grown_in = bytes_in - last[1] if bytes_in >= last[1] else bytes_in
        grown_out = bytes_out - last[2] if bytes_out >= last[2] else bytes_out
        self._samples.append(TransferSample(timestamp, grown_in / elapsed, grown_out / elapsed))

    def samples(self) -> list[TransferSample]:
        return list(self._samples)

    def as_rows(self) -> list[list[float]]:
        """``[timestamp, in B/s, out B/s]`` rows, rounded for display."""
        return [[round(s.timestamp, 2), round(s.in_rate), round(s.out_rate)] for s in self._samples]
