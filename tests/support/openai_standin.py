"""A STAND-IN for an external LLM endpoint (Ollama / vLLM / llama.cpp server) in tests.

It is not an LLM: it implements just enough of the OpenAI-compatible HTTP API
(``GET /v1/models``, ``POST /v1/chat/completions``) to answer deterministically, on a
real aiohttp server bound to 127.0.0.1, so the code-generation executor and capability
detection are tested over real HTTP. Prompts can steer it into failure modes:

- ``[standin:http-500]``  answers HTTP 500
- ``[standin:malformed]`` answers 200 with a body that is not JSON
- ``[standin:no-content]`` answers JSON without ``choices``
- ``[standin:hang]``      never answers until the server stops
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

STANDIN_MODEL = "standin-coder"
MAX_RECORDED = 100


def standin_reply(prompt: str) -> str:
    """The deterministic 'code' the stand-in returns for ``prompt``."""
    n = len(prompt)
    return f"# stand-in reply to a {n}-character prompt\ndef answer():\n    return {n}\n"


class OpenAIStandin:
    """Stand-in LLM server. ``async with OpenAIStandin() as s: s.url``."""

    def __init__(self, model: str = STANDIN_MODEL) -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenAIStandin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if len(self.requests) < MAX_RECORDED:
            self.requests.append(body)
        prompt = body["messages"][-1]["content"]
        if "[standin:http-500]" in prompt:
            return web.Response(status=500, text="stand-in internal error")
        if "[standin:malformed]" in prompt:
            return web.Response(status=200, text="{not json", content_type="application/json")
        if "[standin:no-content]" in prompt:
            return web.json_response({"id": "x", "object": "chat.completion"})
        if "[standin:hang]" in prompt:
            await self._release.wait()
        reply = {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": standin_reply(prompt)},
                    "finish_reason": "stop",
                }
            ],
        }
        return web.Response(text=json.dumps(reply), content_type="application/json")
