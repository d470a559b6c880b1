"""Async requests to an OpenAI-compatible /chat/completions, capped in flight, retried with backoff."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ClientError(Exception):
    """A request that failed for good (after its retries, or with a status that retrying cannot fix)."""


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    """`reasoning_content` (vLLM, DeepSeek) or `reasoning` of the message, where the server splits it off."""


@dataclass
class Counts:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replies_without_usage: int = 0


class ChatClient:
    """One httpx.AsyncClient, a semaphore of `concurrency`, and token counts taken from `usage`."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=endpoint.rstrip("/") + "/", headers=headers, timeout=timeout_s, transport=transport
        )
        self.model, self.retries, self.backoff_s = model, retries, backoff_s
        self._sem = asyncio.Semaphore(concurrency)
        self.counts = Counts()

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        body = {"model": self.model, "messages": messages, **params}
        async with self._sem:
            for attempt in range(self.retries + 1):
                self.counts.requests += 1
                try:
                    resp = await self._http.post("chat/completions", json=body)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status_code == 200:
                        return self._reply(resp.json())
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    if resp.status_code not in RETRY_STATUS:
                        raise ClientError(error)
                if attempt < self.retries:
                    self.counts.retries += 1
                    await asyncio.sleep(self.backoff_s * 2**attempt)
        raise ClientError(f"{error} (after {self.retries} retries)")

    def _reply(self, data: dict[str, Any]) -> Reply:
        usage = data.get("usage") or {}
        if not usage:
            self.counts.replies_without_usage += 1
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.counts.prompt_tokens += prompt
        self.counts.completion_tokens += completion
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        return Reply(
            message.get("content") or "",
            choice.get("finish_reason"),
            prompt,
            completion,
            reasoning if isinstance(reasoning, str) else None,
        )

    async def aclose(self) -> None:
        await self._http.aclose()
