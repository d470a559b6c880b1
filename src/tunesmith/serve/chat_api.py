"""`POST /v1/chat/completions`: one answer (or n) to a conversation, whole or as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tunesmith.serve import formatting as fmt
from tunesmith.serve.adapters import ModelSet
from tunesmith.serve.engine import Engine, GenerationFailed
from tunesmith.serve.errors import SERVER, APIError, error_body
from tunesmith.serve.prepare import Prepared, prepare_chat
from tunesmith.serve.runner import Run
from tunesmith.serve.schemas import ChatRequest, parse
from tunesmith.serve.settings import ServeSettings
from tunesmith.serve.transport import note, read_json, respond, start_run


async def chat_completions(
    request: Request, engine: Engine, models: ModelSet, settings: ServeSettings
) -> Response:
    body = parse(ChatRequest, await read_json(request, settings.max_body_bytes))
    prepared = prepare_chat(body, models, settings)
    run = start_run(engine, prepared, request)
    request_id = fmt.new_id("chatcmpl")
    return await respond(
        request,
        run,
        prepared,
        body.stream,
        lambda: _events(run, prepared, body, request_id, request),
        lambda: _collect(run, prepared, body, request_id, request),
    )


async def _collect(
    run: Run, prepared: Prepared, body: ChatRequest, request_id: str, request: Request
) -> dict[str, Any]:
    count = len(prepared.jobs)
    texts, finishes = [""] * count, ["stop"] * count
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    token_text = fmt.TokenText(prepared.served.tokenizer)
    try:
        async for update in run.updates(request.is_disconnected):
            texts[update.index] += update.text
            if body.logprobs:
                logprobs[update.index] += [token_text.chat_entry(t) for t in update.tokens]
            if update.finish:
                finishes[update.index] = update.finish
    except GenerationFailed as exc:
        raise APIError(500, str(exc), SERVER) from None
    choices = [
        fmt.chat_choice(i, texts[i], finishes[i], logprobs[i] if body.logprobs else None)
        for i in range(count)
    ]
    return fmt.chat_completion(
        request_id, prepared.served.name, choices, prepared.prompt_tokens, run.completion_tokens
    )


async def _events(
    run: Run, prepared: Prepared, body: ChatRequest, request_id: str, request: Request
) -> AsyncIterator[str]:
    model, created = prepared.served.name, int(time.time())
    token_text = fmt.TokenText(prepared.served.tokenizer)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        return fmt.sse(fmt.chat_chunk(request_id, model, created, choices, usage))

    yield chunk(
        [fmt.chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(len(prepared.jobs))]
    )
    try:
        async for update in run.updates():
            note(request, run, prepared)
            logprobs = [token_text.chat_entry(t) for t in update.tokens] if body.logprobs else None
            if update.text or logprobs:
                yield chunk([fmt.chunk_choice(update.index, {"content": update.text}, None, logprobs)])
            if update.finish:
                yield chunk([fmt.chunk_choice(update.index, {}, update.finish)])
    except GenerationFailed as exc:
        yield fmt.sse(error_body(str(exc), SERVER))
    else:
        if body.include_usage():
            yield chunk([], fmt.usage(prepared.prompt_tokens, run.completion_tokens))
    yield fmt.sse("[DONE]")
