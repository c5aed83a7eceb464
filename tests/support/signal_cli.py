"""``swarm-notebook signal`` in its own process, for tests of the shipped command."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


@asynccontextmanager
async def cli_signal_server(*flags: str) -> AsyncIterator[tuple[str, str]]:
    """Start ``swarm-notebook signal --port 0 FLAGS``; yield (its URL, the line naming it).

    The server is terminated and awaited on the way out, whatever the test did.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarm_notebook.cli.main", "signal", "--port", "0",
        *flags, "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        yield line.rsplit(" ", 1)[1].strip(), line
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
