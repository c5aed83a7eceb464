"""The network thread's loop: uvloop when installed, asyncio's otherwise; the caller's untouched."""

from __future__ import annotations

import asyncio

import uvloop

from swarm_notebook._util.loop_thread import LoopThread, fastest_loop_factory


def test_the_network_thread_runs_uvloop_when_it_is_installed() -> None:
    runner = LoopThread(name="test-uvloop")
    runner.start()
    try:
        assert isinstance(runner.loop, uvloop.Loop)
        assert runner.run_sync(asyncio.sleep(0, result=7)) == 7
    finally:
        runner.stop()
    assert fastest_loop_factory() is uvloop.new_event_loop


async def test_the_callers_loop_is_not_replaced_and_a_factory_can_be_given() -> None:
    caller = asyncio.get_running_loop()
    runner = LoopThread(name="test-asyncio", loop_factory=asyncio.new_event_loop)
    runner.start()
    try:
        assert runner.loop is not caller
        assert not isinstance(runner.loop, uvloop.Loop)
        assert await runner.call(asyncio.sleep(0, result="ok")) == "ok"
        assert asyncio.get_running_loop() is caller
    finally:
        runner.stop()
