"""Stop a child process when the process that started it dies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

ORPHAN_CHECK_S = 1.0


async def stop_when_orphaned(
    parent: int, stop: asyncio.Event, said: Callable[[str], None] | None = None
) -> None:
    """Set ``stop`` once ``parent`` is no longer our parent (it died: we were re-parented).

    Linux has no portable event for it (``PR_SET_PDEATHSIG`` follows the parent *thread*,
    which a kernel's helper threads make unreliable), so this looks once a second.
    """
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(ORPHAN_CHECK_S)
    stop.set()
    if said is not None:
        said("parent process gone")
