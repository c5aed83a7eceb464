"""An IPython shell with the extension loaded (optionally joined), and a sync poll helper.

The magics tests, live output, sessions and the roster magic all drive the same kind of
shell; one place makes sure each test leaves no instance or extension behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell


@contextlib.contextmanager
def loaded_shell() -> Iterator[InteractiveShell]:
    """The process's ``InteractiveShell`` with ``%load_ext swarm_notebook``; cleared after."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "swarm_notebook")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "swarm_notebook")
        InteractiveShell.clear_instance()


@contextlib.contextmanager
def joined_shell(room: str, signaling_url: str, profile: Path) -> Iterator[InteractiveShell]:
    """A loaded shell that ran ``%swarm join`` (its failure fails the caller at once)."""
    with loaded_shell() as ip:
        result = ip.run_cell(f"%swarm join {room} --signaling {signaling_url} --profile {profile}")
        assert result.error_in_exec is None, result.error_in_exec
        yield ip


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Re-check a condition every 20 ms until it holds (the condition is the sync point)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
