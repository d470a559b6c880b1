"""Response bodies in the OpenAI shapes (`ChatCompletion`, `ChatCompletionChunk`, `Completion`).

Plain dicts built to the field names of the `openai` package's `types/`; the tests read them back
through the official client, which is the check that they parse.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tunesmith.serve.runner import TokenInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class TokenText:
    """Token ids as the text pieces logprobs name them by (decoded one at a time, specials kept)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def chat_entry(self, info: TokenInfo) -> dict[str, Any]:
        text = self(info.token)
        return {
            "token": text,
            "logprob": info.logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := self(tid)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                for tid, lp in info.top
            ],
        }

    def completion_logprobs(self, tokens: list[TokenInfo], offset: int, top: bool) -> dict[str, Any]:
        """The legacy completions logprobs object; `offset`: where these tokens' text starts."""
        texts = [self(info.token) for info in tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [info.logprob for info in tokens],
            "top_logprobs": [{self(t): lp for t, lp in info.top} for info in tokens] if top else None,
            "text_offset": offsets,
        }


def chat_completion(
    request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chat_choice(index: int, text: str, finish: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
        "logprobs": None if logprobs is None else {"content": logprobs},
    }


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chunk_choice(
    index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "finish_reason": finish,
        "logprobs": None if logprobs is None else {"content": logprobs},
    }


def completion(
    request_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None,
    created: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def completion_choice(
    index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def model_card(name: str, created: int, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunesmith", "parent": parent}
