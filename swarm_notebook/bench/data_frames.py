"""The frames a data-movement benchmark moves, and an RSS sampler for both ends.

* ``df50``: 4 float64 columns of uniform random numbers (incompressible), ~50 MB.
* ``realistic50``: what a data scientist's frame looks like, ~50 MB in pandas: a
  categorical of city names, small ints, prices and scores rounded to 2 decimals,
  second-resolution timestamps and a flag. Its dtypes are sent as they are.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import psutil

DF50_ROWS = 1_638_400  # 4 x 8 bytes a row: 52.4 MB
REALISTIC50_ROWS = 1_250_000  # ~42 bytes a row in pandas: 52.5 MB
CITIES = ("Paris", "Berlin", "Rome", "Madrid", "Oslo", "Wien", "Lisboa", "Praha", "Dublin")


def df50(rows: int = DF50_ROWS) -> pd.DataFrame:
    """Random float64 in four columns."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({c: rng.random(rows) for c in "abcd"})


def realistic50(rows: int = REALISTIC50_ROWS) -> pd.DataFrame:
    """Categorical strings, small ints, 2-decimal floats, timestamps and a flag."""
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "city": pd.Categorical(rng.choice(CITIES, rows)),
            "count": rng.integers(0, 100, rows),
            "qty": rng.integers(0, 1000, rows),
            "price": np.round(rng.random(rows) * 100, 2),
            "score": np.round(rng.normal(50, 10, rows), 2),
            "when": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(rng.integers(0, 365 * 86400, rows), unit="s"),
            "flag": rng.integers(0, 2, rows).astype(bool),
        }
    )


FRAMES: dict[str, Callable[[int], pd.DataFrame]] = {"df50": df50, "realistic50": realistic50}


def frame_bytes(frame: pd.DataFrame) -> int:
    """What the frame takes in pandas (deep), the size its ratios are stated against."""
    return int(frame.memory_usage(index=True, deep=True).sum())


_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_pids(pids: Iterable[int]) -> list[int]:
    """The given processes and all their descendants (the sandbox children)."""
    out: list[int] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out += [pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
    return out


_PSS_PARTS = (b"Pss_Anon:", b"Pss_Shmem:")


def rss_of(pids: Iterable[int]) -> int:
    """Memory ``pids`` hold: summed proportional set size of anonymous and shared memory
    (``Pss_Anon`` + ``Pss_Shmem`` in ``/proc/<pid>/smaps_rollup``).

    RSS summed over a process tree counts twice a page that two of its processes map: the
    swarm's sandbox child passes its results to the worker in shared memory, so RSS would
    show such a result twice. PSS splits each shared page among the processes mapping
    it, so the sum is what the tree really holds. File-backed pages (the interpreter and
    its libraries) are left out: shared with every Python process on the machine, their
    share moves as other processes start and stop, and no transfer allocates them. Every
    tool is measured this way. Where smaps_rollup cannot be read, that process's RSS
    (``statm``) counts instead, which can only count more.
    """
    total = 0
    for pid in pids:
        found, held = 0, 0
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(_PSS_PARTS):
                        held += int(line.split()[1]) * 1024
                        found += 1
        except (OSError, IndexError, ValueError):
            found = 0
        if found == len(_PSS_PARTS):
            total += held
            continue
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRss:
    """Samples the memory (PSS, see ``rss_of``) of process trees every ``interval_s`` on
    a thread; keeps the peak.

    The trees are listed once, at the start: the processes a transfer runs through (a
    worker and its warm sandbox child) exist before it begins.
    """

    def __init__(self, pids: list[int], interval_s: float = 0.01) -> None:
        self.pids = tree_pids(pids)
        self.interval_s = interval_s
        self.baseline = rss_of(self.pids)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_of(self.pids))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_of(self.pids))

    @property
    def above_baseline(self) -> int:
        return self.peak - self.baseline
