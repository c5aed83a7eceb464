"""A short, display-only summary of a value's shape and dtypes (what a ``RemoteRef`` shows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

MAX_COLUMNS = 64  # a summary, not a schema: wide frames are cut with a count of the rest


def describe_value(value: Any) -> dict[str, str]:
    """``{column: dtype}`` for a DataFrame, ``{name: dtype}`` for a Series, ``{"array":
    "float64[3, 4]"}`` for an ndarray, ``{"type": name}`` for anything else.

    >>> describe_value(pd.DataFrame({"a": [1], "b": ["x"]}))
    {'a': 'int64', 'b': 'str'}
    """
    if isinstance(value, pd.DataFrame):
        summary = {str(c): str(t) for c, t in list(value.dtypes.items())[:MAX_COLUMNS]}
        if value.shape[1] > MAX_COLUMNS:
            summary["..."] = f"{value.shape[1] - MAX_COLUMNS} more columns"
        return summary
    if isinstance(value, pd.Series):
        return {str(value.name): str(value.dtype)}
    if isinstance(value, np.ndarray):
        return {"array": f"{value.dtype}[{', '.join(str(n) for n in value.shape)}]"}
    return {"type": type(value).__name__}


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The value's ``shape`` when it has one (frames, series, arrays), else None."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
        return shape
    return None
