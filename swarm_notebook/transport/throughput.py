"""How fast one link moves bulk data, measured from the large messages it carried.

The compression decision (``protocol/compression.py``) weighs the codec's speed against
the link's: compressing pays on a 30 MB/s aiortc link and may not on a fast one. Each
chunked message of at least ``min_bytes`` that a link sends or receives is one sample
(bytes over the time from its first to its last chunk); small messages measure latency,
not throughput, and are ignored. Until a link has carried one, the estimate is ``prior``.

Example::

    >>> est = ThroughputEstimate(prior=30e6)
    >>> est.add(8_000_000, 0.1)
    >>> round(est.bytes_per_s / 1e6)
    80
"""

from __future__ import annotations

# aiortc's pure-Python SCTP between two processes on this kind of machine (27-33 MB/s
# measured): the best guess for a link that has not carried a large message yet.
DEFAULT_PRIOR_BYTES_PER_S = 30e6
MIN_SAMPLE_BYTES = 1024 * 1024


class ThroughputEstimate:
    """An exponentially weighted mean of measured bytes per second for one link."""

    def __init__(
        self,
        prior: float = DEFAULT_PRIOR_BYTES_PER_S,
        *,
        min_bytes: int = MIN_SAMPLE_BYTES,
        weight: float = 0.5,
    ) -> None:
        self.prior = prior
        self.min_bytes = min_bytes
        self.weight = weight
        self.samples = 0
        self._mean: float | None = None

    def add(self, nbytes: int, seconds: float) -> None:
        """One transfer of ``nbytes`` that took ``seconds`` from first to last chunk."""
        if nbytes < self.min_bytes or seconds <= 0:
            return
        rate = nbytes / seconds
        self._mean = (
            rate if self._mean is None else (self.weight * rate + (1 - self.weight) * self._mean)
        )
        self.samples += 1

    @property
    def bytes_per_s(self) -> float:
        """The current estimate (the prior until a sample arrived)."""
        return self.prior if self._mean is None else self._mean
