"""swarm_notebook: a peer-to-peer swarm of notebooks and workers over WebRTC.

>>> import swarm_notebook                                       # doctest: +SKIP
>>> c = await swarm_notebook.join("lab", allow_remote_code=False)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from swarm_notebook.client import Coordinator

__all__ = [
    "Coordinator",
    "__version__",
    "current",
    "join",
    "load_ipython_extension",
    "unload_ipython_extension",
    "verify_consensus",
]


async def join(room: str = "default", **kwargs: Any) -> Coordinator:
    """Join a room; see ``swarm_notebook.client.join`` for the options."""
    from swarm_notebook.client import join as _join

    return await _join(room, **kwargs)


def verify_consensus(result: dict[str, Any]) -> bool:
    """Re-check a consensus result: every signature, membership and the tally."""
    from swarm_notebook.governance.consensus import verify_consensus as _verify

    return _verify(result)


def current() -> Coordinator:
    """The coordinator ``%swarm join`` created in this IPython session (shared with code).

    >>> c = swarm_notebook.current()  # doctest: +SKIP
    """
    from swarm_notebook.notebook.extension import current as _current

    return _current()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext swarm_notebook``: register ``%swarm`` and ``%%swarm``."""
    from swarm_notebook.notebook.extension import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext swarm_notebook``: leave the swarm and remove the magics."""
    from swarm_notebook.notebook.extension import unload_ipython_extension as _unload

    _unload(ipython)


def __getattr__(name: str) -> Any:
    if name == "Coordinator":
        from swarm_notebook.client import Coordinator

        return Coordinator
    raise AttributeError(name)
