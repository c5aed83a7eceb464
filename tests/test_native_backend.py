"""The native (libdatachannel) backend on its own: churn under traffic, in a 3.13 child.

Run in a child process with a Python that has libdatachannel-py (see
``support/native_python.py``), so the 3.11 suite checks it too. A GIL deadlock makes the
child dump its threads and exit, which fails the test with the stacks.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.native_python import native_python
from tests.support.procs import REPO

pytestmark = pytest.mark.timeout(120)


def test_links_made_and_closed_under_traffic_never_deadlock() -> None:
    python = native_python()
    if python is None:
        pytest.skip("no Python >= 3.13 with libdatachannel-py here (`./dev test` makes .venv313)")
    run = subprocess.run(
        [python, os.path.join(REPO, "tests", "support", "native_churn.py"), "30", "60"],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 30
    # The background links kept bouncing their messages through every connect and close.
    assert all(count > 100 for count in result["background"]), result
    assert result["send_failures"] == 0, result
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
