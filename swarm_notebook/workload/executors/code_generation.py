"""``code-generation``: ask a local OpenAI-compatible LLM server (Ollama, vLLM, llama.cpp).

Example::

    executor = CodeGenerationExecutor("http://127.0.0.1:11434", "qwen2.5-coder")
    await executor.run({"prompt": "a function that reverses a list"}, ctx)
    # {"success": True, "code": "...", "provider": "qwen2.5-coder@http://127.0.0.1:11434"}
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import aiohttp
import msgspec

from swarm_notebook.workload.executors.base import (
    ErrorType,
    TaskContext,
    TaskRefused,
    failure,
    parse_task_data,
)

MAX_PROMPT_CHARS = 100_000
MAX_TOKENS_CAP = 32_768
MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class CodeGenerationData(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
    temperature: float = 0.7
    max_tokens: int = 2048


def base_url(endpoint_url: str) -> str:
    """``http://host:port`` from an endpoint given with or without ``/v1``."""
    url = endpoint_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def list_models(
    session: aiohttp.ClientSession, endpoint_url: str, timeout_s: float, api_key: str | None = None
) -> list[str]:
    """Model ids from ``GET /v1/models``.

    Raises ``aiohttp.ClientError``, ``TimeoutError`` or ``ValueError`` (bad answer).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(
        f"{base_url(endpoint_url)}/v1/models",
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        resp.raise_for_status()
        body = json.loads(await resp.content.read(MAX_RESPONSE_BYTES))
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models answer has no 'data' list")
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


class CodeGenerationExecutor:
    """Executor for ``code-generation`` backed by one chat-completions endpoint."""

    task_type = "code-generation"

    def __init__(
        self,
        endpoint_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.endpoint_url = base_url(endpoint_url)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Send the prompt; the reply text comes back as ``code``."""
        task = parse_task_data(data, CodeGenerationData)
        if not task.prompt.strip() or len(task.prompt) > MAX_PROMPT_CHARS:
            raise TaskRefused(
                ErrorType.BAD_INPUT, f"prompt must be 1-{MAX_PROMPT_CHARS} characters"
            )
        if not (math.isfinite(task.temperature) and 0.0 <= task.temperature <= 2.0):
            raise TaskRefused(ErrorType.BAD_INPUT, "temperature must be between 0 and 2")
        if not 1 <= task.max_tokens <= MAX_TOKENS_CAP:
            raise TaskRefused(ErrorType.BAD_INPUT, f"max_tokens must be 1-{MAX_TOKENS_CAP}")
        timeout = self.timeout if ctx.timeout_s is None else min(self.timeout, ctx.timeout_s)
        try:
            async with asyncio.timeout(timeout):
                return await self._complete(task)
        except TimeoutError:
            return failure(
                ErrorType.TIMEOUT,
                f"LLM at {self.endpoint_url} gave no answer within {timeout:.3g} s",
            )
        except aiohttp.ClientResponseError as exc:
            return failure(
                ErrorType.LLM_BAD_RESPONSE,
                f"LLM at {self.endpoint_url} answered HTTP {exc.status}: {exc.message}"[:300],
            )
        except aiohttp.ClientError as exc:
            return failure(
                ErrorType.LLM_UNAVAILABLE, f"cannot reach LLM at {self.endpoint_url}: {exc}"[:300]
            )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _complete(self, task: CodeGenerationData) -> dict[str, Any]:
        session = self._get_session()
        model = self.model
        if not model:
            try:
                models = await list_models(session, self.endpoint_url, self.timeout, self.api_key)
            except ValueError as exc:
                return failure(ErrorType.LLM_BAD_RESPONSE, str(exc))
            if not models:
                return failure(
                    ErrorType.LLM_UNAVAILABLE, f"LLM at {self.endpoint_url} serves no model"
                )
            model = models[0]
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": task.prompt}],
            "temperature": task.temperature,
            "max_tokens": task.max_tokens,
            "stream": False,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with session.post(
            f"{self.endpoint_url}/v1/chat/completions", json=payload, headers=headers
        ) as resp:
            raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            if resp.status >= 400:
                detail = raw[:200].decode("utf-8", errors="replace")
                return failure(
                    ErrorType.LLM_BAD_RESPONSE,
                    f"LLM at {self.endpoint_url} answered HTTP {resp.status}: {detail}",
                )
        if len(raw) > MAX_RESPONSE_BYTES:
            return failure(
                ErrorType.LLM_BAD_RESPONSE, f"LLM answer passed {MAX_RESPONSE_BYTES} bytes"
            )
        text = _reply_text(raw)
        if text is None:
            return failure(
                ErrorType.LLM_BAD_RESPONSE,
                f"LLM at {self.endpoint_url} sent no choices[0].message.content in JSON",
            )
        return {"success": True, "code": text, "provider": f"{model}@{self.endpoint_url}"}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session


def _reply_text(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
        content = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
