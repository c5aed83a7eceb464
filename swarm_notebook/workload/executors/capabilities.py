"""Which capabilities this peer offers, which each task type needs, and building executors.

Example::

    config = ExecutorConfig(python_execution=True, workspace=Path("~/work").expanduser())
    caps = await detect_capabilities(config)   # ["python-execution", "file-management"]
    executors = build_executors(config, caps)  # {"python-computation": ..., "file-analysis": ...}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from dulwich.errors import NotGitRepository
from dulwich.repo import Repo

from swarm_notebook.errors import SandboxUnavailable
from swarm_notebook.workload.executors.base import Executor
from swarm_notebook.workload.executors.code_generation import (
    CodeGenerationExecutor,
    list_models,
)
from swarm_notebook.workload.executors.dask_cluster import DaskCluster
from swarm_notebook.workload.executors.dask_task import DaskTaskExecutor
from swarm_notebook.workload.executors.file_analysis import FileAnalysisExecutor
from swarm_notebook.workload.executors.git_operation import GitOperationExecutor
from swarm_notebook.workload.messages import (
    CODE_GENERATION,
    FILE_MANAGEMENT,
    GIT_VFS,
    LOCAL_LLM,
    PYTHON_EXECUTION,
    REQUIREMENTS,
    requirements_for_task_type,
)
from swarm_notebook.workload.sandbox.bwrap import (
    ISOLATION_BUBBLEWRAP,
    ISOLATION_NONE,
    bubblewrap_problem,
)
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool

log = logging.getLogger(__name__)

__all__ = [
    "CODE_GENERATION",
    "FILE_MANAGEMENT",
    "GIT_VFS",
    "LOCAL_LLM",
    "PYTHON_EXECUTION",
    "REQUIREMENTS",
    "ExecutorConfig",
    "build_executors",
    "close_executors",
    "detect_capabilities",
    "requirements_for_task_type",
]


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """What the owner enabled on this peer. Nothing runs for peers unless listed here."""

    python_execution: bool = False  # explicit owner opt-in to run other peers' code
    # Run other peers' code with the owner's rights where bubblewrap cannot isolate it.
    unsafe_no_isolation: bool = False
    workspace: Path | None = None
    git_repo: Path | None = None
    llm_endpoint: str | None = None  # e.g. "http://127.0.0.1:11434" (Ollama)
    llm_model: str | None = None  # None: the first model the endpoint lists
    llm_api_key: str | None = None
    llm_timeout_s: float = 120.0
    llm_probe_timeout_s: float = 2.0
    sandbox_size: int = 2
    sandbox_memory_limit_mb: int = 1024
    sandbox_default_timeout_s: float = 60.0
    sandbox_max_timeout_s: float = 600.0
    sandbox_session_idle_s: float = 1800.0  # a session unused this long ends
    # Run python-computation on this Dask cluster ("tcp://host:8786" or "local:N") instead
    # of sandboxes: unisolated, so only for delegators on the allowlist.
    dask: str | None = None
    dask_allow: frozenset[str] = frozenset()  # peer ids, besides the room's roster


async def detect_capabilities(config: ExecutorConfig) -> list[str]:
    """Capabilities this peer can really serve now (the LLM endpoint is probed).

    Raises ``SandboxUnavailable`` (why, and how to fix it) when Python execution is on
    but bubblewrap cannot isolate it here and the owner did not accept running unisolated.
    """
    caps: list[str] = []
    if config.python_execution:
        await check_isolation(config)
        caps.append(PYTHON_EXECUTION)
    if config.workspace is not None and config.workspace.is_dir():
        caps.append(FILE_MANAGEMENT)
    if config.git_repo is not None and await asyncio.to_thread(_git_openable, config.git_repo):
        caps.append(GIT_VFS)
    if config.llm_endpoint and await _llm_answers(config):
        caps += [LOCAL_LLM, CODE_GENERATION]
    return caps


def build_executors(
    config: ExecutorConfig,
    capabilities: Iterable[str] | None = None,
    *,
    allowed: Callable[[str], bool] | None = None,
) -> dict[str, Executor]:
    """Executors for the task types whose requirements are met.

    With ``capabilities`` (from :func:`detect_capabilities`) only those count; without,
    whatever the config enables. Sandbox children start on first use or ``await start()``.
    ``allowed(peer_id)`` decides who a Dask-backed executor serves (default: the config's
    ``dask_allow`` only).
    """
    caps = set(capabilities) if capabilities is not None else _configured(config)
    executors: dict[str, Executor] = {}
    if PYTHON_EXECUTION in caps and config.python_execution and config.dask:
        listed = config.dask_allow
        executors["python-computation"] = DaskTaskExecutor(
            DaskCluster(config.dask),
            allowed=allowed or (lambda peer: peer in listed),
            default_timeout_s=config.sandbox_default_timeout_s,
            max_timeout_s=config.sandbox_max_timeout_s,
        )
    elif PYTHON_EXECUTION in caps and config.python_execution:
        executors["python-computation"] = PythonSandboxPool(
            isolation=isolation_mode(config),
            size=config.sandbox_size,
            memory_limit_mb=config.sandbox_memory_limit_mb,
            default_timeout_s=config.sandbox_default_timeout_s,
            max_timeout_s=config.sandbox_max_timeout_s,
            session_idle_timeout_s=config.sandbox_session_idle_s,
        )
    if FILE_MANAGEMENT in caps and config.workspace is not None:
        executors["file-analysis"] = FileAnalysisExecutor(config.workspace)
    if GIT_VFS in caps and config.git_repo is not None:
        executors["git-operation"] = GitOperationExecutor(config.git_repo)
    if LOCAL_LLM in caps and config.llm_endpoint:
        executors["code-generation"] = CodeGenerationExecutor(
            config.llm_endpoint, config.llm_model, config.llm_api_key, config.llm_timeout_s
        )
    return executors


def isolation_mode(config: ExecutorConfig) -> str:
    unisolated = config.unsafe_no_isolation or config.dask
    return ISOLATION_NONE if unisolated else ISOLATION_BUBBLEWRAP


async def check_isolation(config: ExecutorConfig) -> None:
    """Refuse Python execution that bubblewrap cannot isolate, unless the owner opted out
    (or it runs on a Dask cluster, which never isolates and serves an allowlist only)."""
    if config.unsafe_no_isolation or config.dask:
        return
    problem = await asyncio.to_thread(bubblewrap_problem)
    if problem is not None:
        raise SandboxUnavailable(f"python-execution refused: {problem}")


async def close_executors(executors: Mapping[str, Executor]) -> None:
    """Close every executor (children reaped, sessions closed); one failing stops no other."""
    for task_type, executor in executors.items():
        try:
            await executor.close()
        except Exception:
            log.exception("closing the %s executor failed", task_type)


def _configured(config: ExecutorConfig) -> set[str]:
    caps = set()
    if config.python_execution:
        caps.add(PYTHON_EXECUTION)
    if config.workspace is not None and config.workspace.is_dir():
        caps.add(FILE_MANAGEMENT)
    if config.git_repo is not None and _git_openable(config.git_repo):
        caps.add(GIT_VFS)
    if config.llm_endpoint:
        caps.update((LOCAL_LLM, CODE_GENERATION))
    return caps


def _git_openable(path: Path) -> bool:
    try:
        Repo(str(path)).close()
    except (NotGitRepository, OSError):
        return False
    return True


async def _llm_answers(config: ExecutorConfig) -> bool:
    assert config.llm_endpoint is not None
    try:
        async with aiohttp.ClientSession() as session:
            models = await list_models(
                session, config.llm_endpoint, config.llm_probe_timeout_s, config.llm_api_key
            )
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return not config.llm_model or config.llm_model in models
