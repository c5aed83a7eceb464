"""``%load_ext swarm_notebook``: register the magics and give code the session's swarm.

Imports go one way: this module imports the magics and the session; neither imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarm_notebook.errors import UsageError
from swarm_notebook.notebook.magics import SwarmMagics
from swarm_notebook.notebook.session import SESSION_ATTR, SwarmSession, session_of
from swarm_notebook.reasons import Reason

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from swarm_notebook.client import Coordinator

NOT_LOADED = "run `%load_ext swarm_notebook` first"


def _shell_session() -> SwarmSession | None:
    from IPython import get_ipython

    return session_of(get_ipython())


def current() -> Coordinator:
    """The coordinator this IPython session uses (from ``%swarm join`` or ``use()``).

    >>> c = swarm_notebook.current()   # doctest: +SKIP
    >>> c.peers_frame()                # doctest: +SKIP
    """
    from swarm_notebook.errors import NotJoinedError
    from swarm_notebook.notebook.session import NOT_JOINED

    session = _shell_session()
    if session is None:
        raise NotJoinedError(NOT_JOINED)
    return session.require()


def use(coordinator: Coordinator) -> Coordinator:
    """Make a coordinator joined in code the one ``%swarm`` and ``current()`` use.

    >>> c = swarm_notebook.use(await swarm_notebook.join("lab"))  # doctest: +SKIP
    """
    session = _shell_session()
    if session is None:
        raise UsageError(Reason.NOT_LOADED, NOT_LOADED)
    session.use(coordinator)
    return coordinator


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register ``%swarm`` / ``%%swarm`` (``%load_ext swarm_notebook``)."""
    session = session_of(ipython)
    if session is None:
        session = SwarmSession(ipython)
        setattr(ipython, SESSION_ATTR, session)
    ipython.register_magics(SwarmMagics(ipython, session))


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Leave the swarm and forget the session (``%unload_ext swarm_notebook``)."""
    session = session_of(ipython)
    if session is not None:
        session.close()
        delattr(ipython, SESSION_ATTR)
    magics = ipython.magics_manager.magics
    magics["line"].pop("swarm", None)
    magics["cell"].pop("swarm", None)
