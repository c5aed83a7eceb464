"""A signaling server on its own event-loop thread, so synchronous hypothesis tests can
drive it with real websockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any

import aiohttp

from swarm_notebook.signaling import SignalingConfig, SignalingLimits, SignalingServer


class ThreadedServer:
    def __init__(self, limits: SignalingLimits | None = None, call_timeout: float = 60.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._call_timeout = call_timeout
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = SignalingConfig(port=0, limits=limits) if limits else SignalingConfig(port=0)
        self.server = SignalingServer(config)
        self.call(self.server.start())
        self.http: aiohttp.ClientSession = self.call(self._session())

    @staticmethod
    async def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def call(self, coro: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(self._call_timeout)

    def stop(self) -> None:
        self.call(self.http.close())
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
