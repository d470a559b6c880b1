"""`POST /v1/completions`: raw text continuation of one or more prompts (no chat template)."""

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
from tunesmith.serve.prepare import Prepared, echo_text, prepare_completion
from tunesmith.serve.runner import Run, Update
from tunesmith.serve.schemas import CompletionRequest, parse
from tunesmith.serve.settings import ServeSettings
from tunesmith.serve.transport import note, read_json, respond, start_run


async def completions(
    request: Request, engine: Engine, models: ModelSet, settings: ServeSettings
) -> Response:
    body = parse(CompletionRequest, await read_json(request, settings.max_body_bytes))
    prepared = prepare_completion(body, models, settings)
    run = start_run(engine, prepared, request)
    request_id = fmt.new_id("cmpl")
    return await respond(
        request,
        run,
        prepared,
        body.stream,
        lambda: _events(run, prepared, body, request_id, request),
        lambda: _collect(run, prepared, body, request_id, request),
    )


class _Choices:
    """Per-choice text and logprobs, with the echoed prompt in front when asked."""

    def __init__(self, prepared: Prepared, body: CompletionRequest) -> None:
        n = body.n
        self.body = body
        self.token_text = fmt.TokenText(prepared.served.tokenizer)
        self.echo = [
            echo_text(prepared.served, prepared.prompts[i // n]) if body.echo else ""
            for i in range(len(prepared.jobs))
        ]
        self.offsets = [len(text) for text in self.echo]

    def logprobs(self, update: Update) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        result = self.token_text.completion_logprobs(
            update.tokens, self.offsets[update.index], self.body.logprobs > 0
        )
        self.offsets[update.index] += sum(len(t) for t in result["tokens"])
        return result


def _merge(total: dict[str, Any] | None, part: dict[str, Any] | None) -> dict[str, Any] | None:
    if part is None:
        return total
    if total is None:
        return part
    for key in ("tokens", "token_logprobs", "text_offset"):
        total[key] += part[key]
    if total["top_logprobs"] is not None:
        total["top_logprobs"] += part["top_logprobs"]
    return total


async def _collect(
    run: Run, prepared: Prepared, body: CompletionRequest, request_id: str, request: Request
) -> dict[str, Any]:
    state = _Choices(prepared, body)
    count = len(prepared.jobs)
    texts, finishes = list(state.echo), ["stop"] * count
    logprobs: list[dict[str, Any] | None] = [None] * count
    try:
        async for update in run.updates(request.is_disconnected):
            texts[update.index] += update.text
            logprobs[update.index] = _merge(logprobs[update.index], state.logprobs(update))
            if update.finish:
                finishes[update.index] = update.finish
    except GenerationFailed as exc:
        raise APIError(500, str(exc), SERVER) from None
    if body.logprobs is not None:  # a choice that stopped at once still gets an (empty) logprobs object
        empty = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [] if body.logprobs else None,
            "text_offset": [],
        }
        logprobs = [lp or dict(empty) for lp in logprobs]
    choices = [fmt.completion_choice(i, texts[i], finishes[i], logprobs[i]) for i in range(count)]
    usage = fmt.usage(prepared.prompt_tokens, run.completion_tokens)
    return fmt.completion(request_id, prepared.served.name, choices, usage)


async def _events(
    run: Run, prepared: Prepared, body: CompletionRequest, request_id: str, request: Request
) -> AsyncIterator[str]:
    model, created = prepared.served.name, int(time.time())
    state = _Choices(prepared, body)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        return fmt.sse(fmt.completion(request_id, model, choices, usage, created))

    for index, text in enumerate(state.echo):
        if text:
            yield chunk([fmt.completion_choice(index, text, None, None)])
    try:
        async for update in run.updates():
            note(request, run, prepared)
            yield chunk(
                [fmt.completion_choice(update.index, update.text, update.finish, state.logprobs(update))]
            )
    except GenerationFailed as exc:
        yield fmt.sse(error_body(str(exc), SERVER))
    else:
        if body.include_usage():
            yield chunk([], fmt.usage(prepared.prompt_tokens, run.completion_tokens))
    yield fmt.sse("[DONE]")
