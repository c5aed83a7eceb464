"""Decoded refs a sandbox child keeps between its owner's tasks, by content digest.

A task on a ref used to cost the whole value again on every run: read from the store,
sent to the child over its socket, validated and decoded there (about 0.5 s per task for
a 50 MB frame, against 18 ms for Dask, whose workers run tasks where the data is). A child
serves one delegating peer only (see ``PythonSandboxPool._take_idle``), and refs are
readable only by the peer that put them, so a child may keep that peer's decoded refs for
its next tasks. The pool decides what a child keeps and mirrors it (``_Worker.resident``),
so the child never guesses: it keeps what it is told to keep, lends it to tasks, and
drops what it is told to drop.

Each task gets its own view of a kept value, so a task that changes its input changes
nothing for the next one, as if the value had been sent again: a shallow copy of a pandas
object under copy-on-write (pandas >= 3, or with the option set), a copy otherwise.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any


def fresh_view(value: Any) -> Any:
    """A value a task may change without changing ``value``."""
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, pandas.DataFrame | pandas.Series):
        cow = pandas.options.mode.copy_on_write
        return value.copy(deep=not (cow is True or _pandas_major(pandas) >= 3))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return value.copy()
    if isinstance(value, str | bytes | int | float | bool | type(None)):
        return value  # immutable
    return copy.deepcopy(value)


def _pandas_major(pandas: Any) -> int:
    try:
        return int(str(pandas.__version__).split(".", 1)[0])
    except ValueError:
        return 0


class ResidentValues:
    """Kept values by digest: ``keep``, ``lend`` (a fresh view), ``drop``."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, digest: object) -> bool:
        return digest in self._values

    def keep(self, digest: str, value: Any) -> None:
        self._values[digest] = value

    def lend(self, digest: str) -> Any:
        """A fresh view of the value kept under ``digest``; ``KeyError`` if none is."""
        return fresh_view(self._values[digest])

    def digests(self) -> list[str]:
        return list(self._values)

    def drop(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self._values.pop(digest, None)

    def clear(self) -> None:
        self._values.clear()
