"""Shipping functions as source: what travels, what is refused before anything is sent."""

from __future__ import annotations

import functools
import json
import math
import os.path
from collections import OrderedDict
from collections.abc import AsyncIterator
from math import sqrt as square_root

import numpy as np
import pandas as pd
import pytest

from swarm_notebook.errors import UsageError
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from swarm_notebook.workload.source import ARGS_NAME, KWARGS_NAME, ship_function

THRESHOLD = 3  # a notebook global that is a value


def uses_modules(values: list[float]) -> float:
    arr = np.asarray(values)
    return float(square_root(math.fsum(arr * arr)))


def uses_aliases_and_submodules(name: str) -> str:
    return os.path.basename(json.dumps(name)) + str(type(OrderedDict()).__name__)


def uses_a_global_value(x: int) -> bool:
    return x > THRESHOLD


def helper(x: int) -> int:
    return x + 1


def uses_a_local_function(x: int) -> int:
    return helper(x)


def recursive(n: int) -> int:
    return 1 if n <= 1 else n * recursive(n - 1)


def with_nested(xs: list[int]) -> list[int]:
    def double(v: int) -> int:
        return v * 2

    return [double(x) for x in xs]


def frame_summary(df: pd.DataFrame, *, column: str) -> pd.DataFrame:
    return df.groupby("k")[column].sum().reset_index()


@functools.cache
def decorated(x: int) -> int:
    return x


def test_module_imports_travel_as_import_lines() -> None:
    shipped = ship_function(uses_modules)
    assert shipped.imports == (
        "import math",
        "import numpy as np",
        "from math import sqrt as square_root",
    )
    assert shipped.source.startswith("def uses_modules(values")


def test_aliases_and_submodules_are_imported_by_their_real_names() -> None:
    shipped = ship_function(uses_aliases_and_submodules)
    assert "from collections import OrderedDict" in shipped.imports
    assert "import json" in shipped.imports
    assert "import os" in shipped.imports  # ``import os.path`` binds the name os


def test_recursion_builtins_and_nested_functions_need_nothing_extra() -> None:
    assert ship_function(recursive).imports == ()
    assert ship_function(with_nested).imports == ()


def test_a_notebook_global_value_is_refused_naming_it() -> None:
    with pytest.raises(UsageError, match=r"THRESHOLD \(int\).*pass them as arguments"):
        ship_function(uses_a_global_value)


def test_a_function_defined_beside_it_is_shipped_as_an_import_of_its_module() -> None:
    # Defined in an importable module: the peer imports it (and fails clearly if it lacks it).
    shipped = ship_function(uses_a_local_function)
    assert shipped.imports == (f"from {__name__} import helper",)


def test_a_closure_is_refused_naming_the_free_variable() -> None:
    factor = 3

    def scaled(x: int) -> int:
        return x * factor

    with pytest.raises(UsageError, match="uses factor from an enclosing function"):
        ship_function(scaled)


def test_lambdas_decorated_and_non_functions_are_refused_with_the_fix() -> None:
    with pytest.raises(UsageError, match=r"lambda cannot be shipped.*use def"):
        ship_function(lambda x: x)
    with pytest.raises(UsageError, match="can be shipped, not _lru_cache_wrapper"):
        ship_function(decorated)
    with pytest.raises(UsageError, match=r"decorated \(@functools.cache"):
        ship_function(decorated.__wrapped__)
    with pytest.raises(UsageError, match="only plain Python functions"):
        ship_function(len)  # type: ignore[arg-type]


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512, default_timeout_s=20)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


async def test_the_shipped_cell_runs_in_a_real_sandbox_child(pool: PythonSandboxPool) -> None:
    ctx = TaskContext(task_id="t-1", delegator="peer-a")
    shipped = ship_function(uses_modules)
    result = await pool.run(
        {
            "code": shipped.cell(),
            "inputs": {ARGS_NAME: encode_value([[3.0, 4.0]]), KWARGS_NAME: encode_value({})},
        },
        ctx,
    )
    assert result["success"], result
    assert decode_value(result["value"]) == 5.0

    df = pd.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]})
    frame = ship_function(frame_summary)
    result = await pool.run(
        {
            "code": frame.cell(),
            "inputs": {
                ARGS_NAME: encode_value([df]),
                KWARGS_NAME: encode_value({"column": "v"}),
            },
        },
        ctx,
    )
    assert result["success"], result
    pd.testing.assert_frame_equal(decode_value(result["value"]), frame_summary(df, column="v"))
