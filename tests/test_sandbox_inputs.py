"""Task inputs decoded in the sandbox share one budget (issue 10, bounded decoders)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool

CTX = TaskContext(task_id="t-1", delegator="peer-a")
LIMIT = 1_000_000


@pytest.fixture
async def pool() -> AsyncIterator[PythonSandboxPool]:
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=512, max_input_decode_bytes=LIMIT)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


async def test_inputs_that_fit_alone_but_not_together_are_refused_too_large(
    pool: PythonSandboxPool,
) -> None:
    part = np.zeros(400_000 // 8)  # 400 kB: within the budget alone, not three of them
    one = await pool.run({"code": "float(a.sum())", "inputs": {"a": encode_value(part)}}, CTX)
    assert one["success"], one
    assert decode_value(one["value"]) == 0.0
    inputs = {name: encode_value(part) for name in ("a", "b", "c")}
    many = await pool.run({"code": "a.size + b.size + c.size", "inputs": inputs}, CTX)
    assert not many["success"]
    assert many["error_type"] == "too-large", many
    assert "over the limit" in many["error"]
    after = await pool.run({"code": "6 * 7"}, CTX)  # the child keeps serving
    assert decode_value(after["value"]) == 42


async def test_a_40_mb_frame_input_fits_the_default_budget() -> None:
    # Found by the benchmark: a budget tied to the 64 MB result limit refused a 50 MB frame
    # (decoding costs about twice its size); the default follows the memory limit instead.
    import pandas as pd

    frame = pd.DataFrame({c: np.random.default_rng(0).random(1_250_000) for c in "abcd"})
    sandbox = PythonSandboxPool(size=1, memory_limit_mb=1024)
    await sandbox.start()
    try:
        result = await sandbox.run(
            {"code": "len(df)", "inputs": {"df": encode_value(frame)}},
            CTX,
        )
        assert result["success"], result
        assert decode_value(result["value"]) == len(frame)
    finally:
        await sandbox.close()
