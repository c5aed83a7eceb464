"""Shared test settings.

All peers in the tests live on this machine: keep their ICE traffic on loopback (aioice
would otherwise offer the machine's other interfaces). Child processes inherit this.
"""

from __future__ import annotations

import os

os.environ.setdefault("SWARM_NOTEBOOK_ICE_HOSTS", "127.0.0.1")
