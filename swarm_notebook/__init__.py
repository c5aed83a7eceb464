"""swarm_notebook: a peer-to-peer swarm of notebooks and workers over WebRTC.

>>> import swarm_notebook                                       # doctest: +SKIP
>>> c = await swarm_notebook.join("lab", allow_remote_code=False)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from swarm_notebook.api import Coordinator

__all__ = ["Coordinator", "__version__", "join", "verify_consensus"]


async def join(room: str = "default", **kwargs: Any) -> Coordinator:
    """Join a room; see ``swarm_notebook.api.join`` for the options."""
    from swarm_notebook.api import join as _join

    return await _join(room, **kwargs)


def verify_consensus(result: dict[str, Any]) -> bool:
    """Re-check a consensus result: every signature, membership and the tally."""
    from swarm_notebook.coordinator.governance.consensus import verify_consensus as _verify

    return _verify(result)


def __getattr__(name: str) -> Any:
    if name == "Coordinator":
        from swarm_notebook.api import Coordinator

        return Coordinator
    raise AttributeError(name)
