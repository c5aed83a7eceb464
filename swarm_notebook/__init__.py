"""swarm_notebook: a peer-to-peer swarm of notebooks and workers over WebRTC.

>>> import swarm_notebook                                          # doctest: +SKIP
>>> c = await swarm_notebook.join("lab", allow_remote_code=False)  # doctest: +SKIP

Everything a user needs is importable from here; the package root is the public surface.
The names, exactly (``tests/test_surface.py`` holds ``__all__`` to this list):

.. public-names

    join local use current wait_for_peers verify_consensus
    Coordinator NotebookVoter
    TaskFuture SwarmExecutor as_completed wait RemoteSession RemoteRef
    CoordinatorConfig ExecutorConfig TaskPolicy DelegationConfig ConsensusConfig
    KnowledgeConfig MeshConfig
    Reason __version__ load_ipython_extension unload_ipython_extension
    every error class of ``swarm_notebook.errors`` (its ``__all__``)

.. end-public-names

Heavy parts (aiortc, ipywidgets) are imported on first use, so ``import swarm_notebook``
stays fast; type checkers see every name through the ``TYPE_CHECKING`` imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from swarm_notebook import errors as _errors
from swarm_notebook._util.version import __version__
from swarm_notebook.environment import DEFAULT_ROOM
from swarm_notebook.errors import *  # noqa: F403  (the error tree is part of the surface)
from swarm_notebook.reasons import Reason

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator
    from swarm_notebook.coordinator.config import CoordinatorConfig
    from swarm_notebook.futures import SwarmExecutor, TaskFuture, as_completed, wait
    from swarm_notebook.governance.service import ConsensusConfig
    from swarm_notebook.knowledge.service import KnowledgeConfig
    from swarm_notebook.notebook.voter import NotebookVoter
    from swarm_notebook.sessions import RemoteSession
    from swarm_notebook.transport.mesh import MeshConfig
    from swarm_notebook.workload.delegator import DelegationConfig
    from swarm_notebook.workload.executors.capabilities import ExecutorConfig
    from swarm_notebook.workload.policy import TaskPolicy
    from swarm_notebook.workload.refs import RemoteRef

# Imported on first access (``module.__getattr__``): name -> module that defines it.
_LAZY = {
    "Coordinator": "swarm_notebook.client",
    "NotebookVoter": "swarm_notebook.notebook.voter",
    "CoordinatorConfig": "swarm_notebook.coordinator.config",
    "ExecutorConfig": "swarm_notebook.workload.executors.capabilities",
    "TaskPolicy": "swarm_notebook.workload.policy",
    "DelegationConfig": "swarm_notebook.workload.delegator",
    "ConsensusConfig": "swarm_notebook.governance.service",
    "KnowledgeConfig": "swarm_notebook.knowledge.service",
    "MeshConfig": "swarm_notebook.transport.mesh",
    "TaskFuture": "swarm_notebook.futures",
    "SwarmExecutor": "swarm_notebook.futures",
    "as_completed": "swarm_notebook.futures",
    "wait": "swarm_notebook.futures",
    "RemoteSession": "swarm_notebook.sessions",
    "RemoteRef": "swarm_notebook.workload.refs",
}

__all__ = [
    "ConsensusConfig",
    "Coordinator",
    "CoordinatorConfig",
    "DelegationConfig",
    "ExecutorConfig",
    "KnowledgeConfig",
    "MeshConfig",
    "NotebookVoter",
    "Reason",
    "RemoteRef",
    "RemoteSession",
    "SwarmExecutor",
    "TaskFuture",
    "TaskPolicy",
    "__version__",
    "as_completed",
    "current",
    "join",
    "load_ipython_extension",
    "local",
    "unload_ipython_extension",
    "use",
    "verify_consensus",
    "wait",
    "wait_for_peers",
    *_errors.__all__,
]


async def join(room: str = DEFAULT_ROOM, **kwargs: Any) -> Coordinator:
    """Join a room; see ``swarm_notebook.client.join`` for the options."""
    from swarm_notebook.client import join as _join

    return await _join(room, **kwargs)


async def local(workers: int = 2, **kwargs: Any) -> Coordinator:
    """Start a signaling server and ``workers`` sandboxed workers here, and join them.

    The zero-configuration start (like Dask's ``Client()``); ``await c.leave()`` or the
    kernel exiting stops them. Options: see ``swarm_notebook.launcher.local``.

    >>> c = await swarm_notebook.local(workers=2)  # doctest: +SKIP
    """
    from swarm_notebook.launcher import local as _local

    return await _local(workers, **kwargs)


async def wait_for_peers(
    coordinator: Coordinator,
    count: int,
    *,
    capability: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Wait until ``count`` peers are connected; ``Coordinator.wait_for_peers`` does the work.

    >>> await swarm_notebook.wait_for_peers(c, 3, capability="python-execution")  # doctest: +SKIP
    3
    """
    return await coordinator.wait_for_peers(count, capability=capability, timeout=timeout)


def verify_consensus(result: dict[str, Any]) -> bool:
    """Re-check a consensus result: every signature, membership and the tally."""
    from swarm_notebook.governance.consensus import verify_consensus as _verify

    return _verify(result)


def current() -> Coordinator:
    """The coordinator ``%swarm join`` (or ``use()``) gave this IPython session.

    >>> c = swarm_notebook.current()  # doctest: +SKIP
    """
    from swarm_notebook.notebook.extension import current as _current

    return _current()


def use(coordinator: Coordinator) -> Coordinator:
    """Make a coordinator from ``join()`` the one ``%swarm`` and ``current()`` use.

    >>> c = swarm_notebook.use(await swarm_notebook.join("lab"))  # doctest: +SKIP
    """
    from swarm_notebook.notebook.extension import use as _use

    return _use(coordinator)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext swarm_notebook``: register ``%swarm`` and ``%%swarm``."""
    from swarm_notebook.notebook.extension import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext swarm_notebook``: leave the swarm and remove the magics."""
    from swarm_notebook.notebook.extension import unload_ipython_extension as _unload

    _unload(ipython)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm_notebook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
