"""An event loop on its own thread, so the swarm keeps serving while a cell blocks.

The notebook kernel's loop is frozen while a cell runs synchronous code; heartbeats and
incoming tasks must not wait for it. Every aiortc object lives on this loop (aiortc is not
thread-safe), and the public API bridges calls from the caller's loop with ``call``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CANCEL_SETTLE_S = 5.0


def fastest_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when it is installed, else asyncio's.

    Only the network thread's own loop: the kernel's loop is never replaced. aiortc's
    pure-Python SCTP and the framing spend much of their time in loop callbacks, which
    uvloop runs faster.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class LoopThread:
    """Runs one asyncio loop in a daemon thread.

    >>> runner = LoopThread(name="demo")
    >>> runner.start()
    >>> runner.run_sync(asyncio.sleep(0, result=42))
    42
    >>> runner.stop()
    """

    def __init__(
        self,
        name: str = "swarm-notebook-net",
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        self._name = name
        self._loop_factory = loop_factory or fastest_loop_factory()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LoopThread is not started")
        return self._loop

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        loop = self._loop_factory()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on this thread's loop from another loop (e.g. the kernel's).

        Cancelling the caller cancels the work on the network loop too, and returns only
        once that work has finished unwinding (bounded), so state read right after a
        cancel is already settled.
        """
        if self.in_thread():
            return await coro
        caller = asyncio.get_running_loop()
        finished = asyncio.Event()
        # Only a cancelled caller waits for the unwinding; in the common case no second
        # cross-thread wake-up is sent. The lock orders "finished" against "waiting".
        guard = threading.Lock()
        state = {"finished": False, "waiting": False}

        async def tracked() -> T:
            try:
                return await coro
            finally:
                with guard:
                    state["finished"] = True
                    notify = state["waiting"]
                if notify and not caller.is_closed():
                    caller.call_soon_threadsafe(finished.set)

        future = self.submit(tracked())
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            with guard:
                state["waiting"] = True
                already = state["finished"]
            if not already:
                try:
                    await asyncio.wait_for(finished.wait(), CANCEL_SETTLE_S)
                except TimeoutError:
                    pass
            raise

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.in_thread():
            coro.close()
            raise RuntimeError("run_sync called from the network thread would deadlock")
        return self.submit(coro).result(timeout)

    def in_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None
        self._ready.clear()
