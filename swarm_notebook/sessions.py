"""Sessions: a namespace that lives in one peer's sandbox across calls (ipyparallel's
``%px`` namespace, but owned, pinned and bounded).

``c.session("train")`` opens a dedicated sandbox child on one peer (kept out of its warm
pool, still inside bubblewrap, with a private scratch folder); what runs in it keeps its
variables and files for the next call. Only the peer that opened it may use it; it holds
one of that peer's slots until ``close()`` or its idle timeout; if its peer or its sandbox
dies it is *lost*: ``SessionLostError``, and it is never re-created behind your back.

>>> s = c.session("train")                        # doctest: +SKIP
>>> s.run("import numpy as np\\nw = np.zeros(3)").result()   # doctest: +SKIP
>>> s.run("w += 1\\nw.sum()").result()            # doctest: +SKIP
3.0
>>> s.close()                                      # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from swarm_notebook.errors import (
    AttemptsExhausted,
    PeerUnavailable,
    RemoteTaskError,
    SessionLostError,
    UsageError,
    short_id,
)
from swarm_notebook.futures import (
    PYTHON_COMPUTATION,
    SubmitOptions,
    TaskFuture,
    TaskSubmitter,
    start_task,
)
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.source import ARGS_NAME, KWARGS_NAME

OPEN, CLOSED, LOST = "open", "closed", "lost"


class SessionHost(TaskSubmitter, Protocol):
    """What a session needs from a coordinator besides starting tasks."""

    def peer_connected(self, peer_id: str) -> bool: ...


class RemoteSession:
    """A namespace on one peer; ``run`` code or ``submit`` functions in it."""

    def __init__(
        self,
        host: SessionHost,
        name: str,
        peer: str,
        idle_timeout_s: float | None = None,
        on_end: Callable[[RemoteSession], None] | None = None,
    ) -> None:
        self._host = host
        self.name = name
        self.peer = peer
        self.idle_timeout_s = idle_timeout_s
        self.opened_at = time.time()
        self.runs = 0
        self._on_end = on_end
        self._state = OPEN
        self._lost: SessionLostError | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``open``, ``closed`` or ``lost``."""
        return self._state

    @property
    def peer_name(self) -> str | None:
        return self._host.peer_name(self.peer)

    def __repr__(self) -> str:
        where = self.peer_name or short_id(self.peer)
        return f"<RemoteSession {self.name!r} on {where} state={self._state}>"

    # -- running ------------------------------------------------------------------------

    def run(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_output: Callable[[str, str], Any] | None = None,
        **inputs: Any,
    ) -> TaskFuture:
        """Run a cell in the session; the future gives its last expression's value.

        >>> s.run("total = x + 1\\ntotal", x=41).result()   # doctest: +SKIP
        42
        """
        return self._start("cell", {"code": code, "inputs": inputs}, timeout, on_output)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Call ``fn(*args, **kwargs)`` in the session (shipped as source, like ``submit``);
        the function is defined in the session's namespace, so later cells can call it."""
        shipped = self._host.ship(fn)
        inputs = {ARGS_NAME: list(args), KWARGS_NAME: dict(kwargs)}
        return self._start(shipped.name, {"code": shipped.cell(), "inputs": inputs}, None, None)

    def data(self, code: str, inputs: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        """The task data of one cell run in this session (for ``%%swarm run --session``)."""
        self.check()
        with self._lock:
            self.runs += 1
        return {
            "code": code,
            "inputs": inputs,
            "outputs": outputs,
            "session": self.name,
            "session_op": "run",
        }

    def _start(
        self,
        function: str,
        data: dict[str, Any],
        timeout: float | None,
        on_output: Callable[[str, str], Any] | None,
    ) -> TaskFuture:
        data = self.data(str(data["code"]), dict(data.get("inputs") or {}), [])
        options = SubmitOptions(peer=self.peer, timeout=timeout, retries=0, on_output=on_output)
        return start_task(self._host, function, data, options, translate=self.translate)

    # -- state --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``SessionLostError`` (or a usage error once closed) if it cannot be used."""
        if self._lost is not None:
            raise self._lost
        if self._state == CLOSED:
            raise UsageError(Reason.SESSION_LOST, f"session {self.name!r} was closed")
        if not self._host.peer_connected(self.peer):
            raise self.lose(f"its peer {self.peer_name or short_id(self.peer)} is not connected")

    def lose(self, why: str) -> SessionLostError:
        """Mark the session lost (once) and return the error that says why."""
        with self._lock:
            if self._lost is None:
                self._lost = SessionLostError(self.name, why, self.peer)
                self._state = LOST
            lost = self._lost
        if self._on_end is not None:
            self._on_end(self)
        return lost

    def translate(self, error: BaseException, reply: dict[str, Any] | None) -> BaseException:
        """The error a failed task in this session raises: ``SessionLostError`` when the
        session is gone (the peer died, the sandbox died, it expired), else ``error``."""
        if reply is not None and (
            reply.get("session_lost") or reply.get("error_type") == Reason.SESSION_LOST
        ):
            return self.lose(str(reply.get("error") or "its sandbox ended"))
        if isinstance(error, AttemptsExhausted | PeerUnavailable):
            return self.lose(f"its peer went away ({error.message})")
        if isinstance(error, RemoteTaskError) and error.error_type == Reason.SESSION_LOST:
            return self.lose(error.error)
        return error

    def close(self, timeout: float = 60.0) -> None:
        """End the session on its peer (frees its slot and its sandbox); safe to repeat."""
        if self._state != OPEN:
            return
        self._state = CLOSED
        try:
            task = self._host.submit_task(
                PYTHON_COMPUTATION,
                {"code": "", "session": self.name, "session_op": "close"},
                peer=self.peer,
                max_attempts=1,
            )
            task.future.result(timeout)
        except Exception:
            pass  # its peer is gone or it ended already: nothing is left open there
        finally:
            if self._on_end is not None:
                self._on_end(self)

    def as_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peer": self.peer,
            "peer_name": self.peer_name,
            "state": self._state,
            "runs": self.runs,
            "opened_at": self.opened_at,
            "idle_timeout_s": self.idle_timeout_s,
            "lost_because": self._lost.why if self._lost else None,
        }
