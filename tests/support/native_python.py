"""Finding a Python that can run the native (libdatachannel) backend, for mixed-room tests.

libdatachannel-py has wheels for CPython >= 3.13 only, so the native side of a mixed room
usually runs in its own venv: ``.venv313`` next to the repository (``./dev`` makes it), or
in the main worktree when tests run from a linked one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

from tests.support.procs import REPO

PROBE = "import libdatachannel, swarm_notebook.transport.backends.native_backend"


def _candidates() -> list[Path]:
    found = [Path(sys.executable)] if sys.version_info >= (3, 13) else []
    found.append(Path(REPO) / ".venv313" / "bin" / "python")
    try:
        common = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        found.append(Path(common).parent / ".venv313" / "bin" / "python")
    except (OSError, subprocess.SubprocessError):
        pass
    return found


@cache
def native_python() -> str | None:
    """An interpreter that imports libdatachannel and this checkout's package, or None."""
    for python in _candidates():
        if not python.exists():
            continue
        env = {**os.environ, "PYTHONPATH": REPO}
        probe = subprocess.run([str(python), "-c", PROBE], env=env, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return str(python)
    return None
