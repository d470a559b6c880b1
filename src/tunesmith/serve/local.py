"""The engine for one caller in its own thread (`tunesmith chat`, scripts): text in, text out.

The same engine the server runs, so a chat in the terminal samples, stops and detokenizes exactly
as the HTTP API does; several callers may share one engine and are batched together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tunesmith.serve.engine import FINISH_CANCELLED, FINISH_ERROR, Engine, GenerationFailed
from tunesmith.serve.sampling import SamplingParams
from tunesmith.serve.textgen import TextStream


def stream_text(
    engine: Engine,
    tokenizer: Any,
    prompt: list[int],
    params: SamplingParams,
    stop: list[str] | None = None,
    adapter: str | None = None,
) -> Iterator[str]:
    """Pieces of the reply as they are decoded; closing the iterator early cancels the generation."""
    text = TextStream(tokenizer, stop)
    events = engine.stream(prompt, params, adapter)
    try:
        for event in events:
            if event.token is not None:
                piece = text.push(event.token)
                if piece.text:
                    yield piece.text
                if piece.stopped:
                    return
            if event.finish in (FINISH_ERROR, FINISH_CANCELLED):
                raise GenerationFailed(event.error or "the engine stopped")
            if event.finish is not None:
                tail = text.finish()
                if tail.text:
                    yield tail.text
                return
    finally:
        events.close()


def generate_text(
    engine: Engine,
    tokenizer: Any,
    prompt: list[int],
    params: SamplingParams,
    stop: list[str] | None = None,
    adapter: str | None = None,
) -> str:
    """The whole reply at once."""
    return "".join(stream_text(engine, tokenizer, prompt, params, stop, adapter))
