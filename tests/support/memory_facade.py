"""A notebook's ``Coordinator`` facade and one worker, joined over the in-memory network.

Both are real ``SwarmCoordinator``s run on the facade's own network thread, as ``join()``
runs them; only the network between them is the in-memory twin of the mesh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from swarm_notebook._util.loop_thread import LoopThread
from swarm_notebook.client import Coordinator
from swarm_notebook.coordinator.config import CoordinatorConfig
from swarm_notebook.coordinator.coordinator import SwarmCoordinator
from swarm_notebook.coordinator.events import EventBus
from swarm_notebook.identity import Identity
from swarm_notebook.transport.memory import MemoryNetwork, MemoryTransport


@asynccontextmanager
async def facade_and_worker(
    tmp_path: Path, worker: CoordinatorConfig, capability: str
) -> AsyncIterator[tuple[Coordinator, SwarmCoordinator]]:
    """The asker behind the facade and a worker with ``worker``'s config, once the asker
    sees the worker offer ``capability``; both leave on exit."""
    net = MemoryNetwork()
    runner = LoopThread(name="facade-test-net")
    runner.start()
    events = EventBus()
    configs = {"asker": CoordinatorConfig(), "worker": worker}

    async def build() -> list[SwarmCoordinator]:
        cores = []
        for name, cfg in configs.items():
            identity = Identity.generate()
            transport = MemoryTransport(identity, net, "room")
            bus = events if name == "asker" else EventBus()
            core = SwarmCoordinator(identity, transport, cfg, tmp_path / name, bus)
            await core.start()
            cores.append(core)
        assert await cores[0].settle(10.0, 1, capability) == []
        return cores

    asker, serving = await runner.call(build())
    coordinator = Coordinator(runner, asker, events)
    try:
        yield coordinator, serving
    finally:
        await runner.call(serving.leave())
        await coordinator.leave()  # the asker, then the network thread both ran on
