"""Task executors: what runs a delegated task locally, safely, with limits.

The names below load lazily so that the sandbox child process, which imports this
package, does not pay for aiohttp and dulwich.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from swarm_notebook.workload.executors.base import (
    ErrorType,
    Executor,
    TaskContext,
    TaskRefused,
    failure,
    run_executor,
)

if TYPE_CHECKING:
    from swarm_notebook.workload.executors.capabilities import (
        REQUIREMENTS,
        ExecutorConfig,
        build_executors,
        close_executors,
        detect_capabilities,
        requirements_for_task_type,
    )
    from swarm_notebook.workload.executors.code_generation import CodeGenerationExecutor
    from swarm_notebook.workload.executors.file_analysis import FileAnalysisExecutor
    from swarm_notebook.workload.executors.git_operation import GitOperationExecutor

_LAZY = {
    "REQUIREMENTS": "capabilities",
    "ExecutorConfig": "capabilities",
    "build_executors": "capabilities",
    "close_executors": "capabilities",
    "detect_capabilities": "capabilities",
    "requirements_for_task_type": "capabilities",
    "CodeGenerationExecutor": "code_generation",
    "FileAnalysisExecutor": "file_analysis",
    "GitOperationExecutor": "git_operation",
}

__all__ = [
    "REQUIREMENTS",
    "CodeGenerationExecutor",
    "ErrorType",
    "Executor",
    "ExecutorConfig",
    "FileAnalysisExecutor",
    "GitOperationExecutor",
    "TaskContext",
    "TaskRefused",
    "build_executors",
    "close_executors",
    "detect_capabilities",
    "failure",
    "requirements_for_task_type",
    "run_executor",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
