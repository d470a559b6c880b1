"""Tokenize many samples, in one process or several, with identical results either way.

Samples are cut into contiguous chunks, each chunk is tokenized on its own, and the chunks are
joined in order, so the output does not depend on how many processes did the work. Rows that
cannot be used are reported, not raised: those with nothing to train on are `dropped`, those the
chat template refuses (e.g. tool calls given to a template without tools) are `failed`; the
caller decides what `on_error` makes of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.block import TokenBlock, concat
from tunesmith.data.conversation import Conversation, Sample, TextSample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.tokenize import Reasoning, TokenizedSample, tokenize_conversation, tokenize_text

PARALLEL_MIN_SAMPLES = 1000
"""Below this many samples, starting processes costs more than it saves."""
CHUNKS_PER_PROCESS = 4


@dataclass(frozen=True)
class TokenizeSettings:
    """Every option that changes the tokens of a sample (so also part of the cache key)."""

    seq_len: int
    method: str = "sft"
    train_on_prompt: bool = False
    mask_history: bool = False
    reasoning: Reasoning = "keep"


@dataclass
class TokenizeResult:
    block: TokenBlock
    truncated: int = 0
    dropped: list[RowIssue] = field(default_factory=list)
    failed: list[RowIssue] = field(default_factory=list)


def default_num_proc() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def tokenize_all(
    samples: Sequence[Sample],
    tokenizer: Any,
    template: str | None,
    settings: TokenizeSettings,
    num_proc: int | None = None,
) -> TokenizeResult:
    """All samples tokenized; in `num_proc` processes when there are enough of them."""
    procs = min(num_proc or default_num_proc(), max(1, len(samples) // 2))
    if procs <= 1 or len(samples) < PARALLEL_MIN_SAMPLES:
        return tokenize_chunk(samples, tokenizer, template, settings)
    import multiprocessing

    chunks = procs * CHUNKS_PER_PROCESS
    step = -(-len(samples) // chunks)
    bounds = [(a, min(a + step, len(samples))) for a in range(0, len(samples), step)]
    # fork shares the samples and tokenizer with the workers for free; elsewhere they are pickled.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(procs, _init_worker, (samples, tokenizer, template, settings)) as pool:
        parts = pool.map(_work, bounds, chunksize=1)
    return merge(parts)


def tokenize_chunk(
    samples: Sequence[Sample], tokenizer: Any, template: str | None, settings: TokenizeSettings
) -> TokenizeResult:
    from jinja2.exceptions import TemplateError

    out: list[TokenizedSample] = []
    result = TokenizeResult(TokenBlock.from_samples([]))
    for sample in samples:
        if isinstance(sample, TextSample):
            out.extend(tokenize_text(tokenizer, sample, settings.seq_len))
            continue
        assert isinstance(sample, Conversation)
        try:
            tokenized = tokenize_conversation(
                tokenizer,
                template or "",
                sample,
                settings.seq_len,
                settings.train_on_prompt,
                mask_history=settings.mask_history,
                reasoning=settings.reasoning,
            )
        except (TemplateError, DataError) as exc:
            reason = str(exc).removeprefix(f"{sample.source}: ")
            result.failed.append(RowIssue(sample.source, f"chat template: {reason}"))
            continue
        result.truncated += tokenized.truncated
        if tokenized.num_trained == 0:
            why = "no trained tokens left after truncation" if tokenized.truncated else "no trained tokens"
            result.dropped.append(RowIssue(sample.source, f"{why} (seq_len {settings.seq_len})"))
            continue
        out.append(tokenized)
    result.block = TokenBlock.from_samples(out)
    return result


def merge(parts: Sequence[TokenizeResult]) -> TokenizeResult:
    """Results of consecutive chunks as one result."""
    merged = TokenizeResult(concat([p.block for p in parts]))
    for part in parts:
        merged.truncated += part.truncated
        merged.dropped.extend(part.dropped)
        merged.failed.extend(part.failed)
    return merged


_WORKER_STATE: tuple[Sequence[Sample], Any, str | None, TokenizeSettings] | None = None


def _init_worker(
    samples: Sequence[Sample], tokenizer: Any, template: str | None, settings: TokenizeSettings
) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (samples, tokenizer, template, settings)


def _work(bounds: tuple[int, int]) -> TokenizeResult:
    assert _WORKER_STATE is not None
    samples, tokenizer, template, settings = _WORKER_STATE
    return tokenize_chunk(samples[bounds[0] : bounds[1]], tokenizer, template, settings)
