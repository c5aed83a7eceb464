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
from swarm_notebook.workload import source as source_module
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.sandbox.child import COMPILED_CELLS_KEPT, TaskRunner
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from swarm_notebook.workload.source import ARGS_NAME, KWARGS_NAME, SourceCache, ship_function

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


def test_the_cache_parses_a_function_once_and_a_redefinition_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SourceCache()
    parses: list[str] = []
    real_parse = source_module._parse

    def counting_parse(fn):  # type: ignore[no-untyped-def]
        parses.append(fn.__name__)
        return real_parse(fn)

    monkeypatch.setattr(source_module, "_parse", counting_parse)
    first = ship_function(uses_modules, cache)
    assert ship_function(uses_modules, cache) == first == ship_function(uses_modules)
    assert parses == ["uses_modules", "uses_modules"]  # the cached call did not parse
    assert len(cache) == 1

    # A re-run cell is a new function (a new code object) with a new body: parsed again.
    namespace: dict[str, object] = {}
    exec(compile("def cell_fn(x):\n    return x + 1\n", __file__, "exec"), namespace)
    old = namespace["cell_fn"]
    assert callable(old)
    with pytest.raises(UsageError):  # exec'd code has no readable source: not cached
        ship_function(old, cache)
    assert len(cache) == 1


def test_cached_source_still_looks_up_imports_when_a_name_is_rebound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = SourceCache()
    assert "import numpy as np" in ship_function(uses_modules, cache).imports
    monkeypatch.setitem(uses_modules.__globals__, "np", math)  # the notebook rebinds np
    assert "import math as np" in ship_function(uses_modules, cache).imports
    monkeypatch.setitem(uses_modules.__globals__, "np", 42)
    with pytest.raises(UsageError, match="np"):
        ship_function(uses_modules, cache)


def test_the_child_compiles_a_repeated_cell_once_and_keeps_a_bounded_number() -> None:
    runner = TaskRunner()
    first = runner.compile_cell("x = 1\nx + 1\n")
    assert runner.compile_cell("x = 1\nx + 1\n") is first
    for i in range(COMPILED_CELLS_KEPT + 5):
        runner.compile_cell(f"{i} + 1")
    assert len(runner._compiled) == COMPILED_CELLS_KEPT
    assert runner.compile_cell("x = 1\nx + 1\n") is not first  # evicted, compiled again
    assert runner.run({"code": "y = 20\ny * 2", "inputs": {}})["success"]
