"""Tokenize many samples, in one process or several, with identical results either way.

Samples are cut into contiguous chunks, each chunk is tokenized on its own, and the chunks are
joined in order, so the output does not depend on how many processes did the work. Rows that
cannot be used are reported, not raised: those with nothing to train on are `dropped`; those for
which the chat template or the tokenizer raises anything at all (tool calls given to a template
without tools, a string the tokenizer cannot encode) are `failed`, in a worker process as in
this one; the caller decides what `on_error` makes of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.block import TokenBlock, concat
from tunesmith.data.conversation import Conversation, Sample, TextSample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.tokenize import (
    Reasoning,
    TokenizedSample,
    bos_token_id,
    tokenize_conversation,
    tokenize_text,
)

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
    pretrain_overlap: int = 0


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
    advance: Callable[[int], None] | None = None,
) -> TokenizeResult:
    """All samples tokenized; in `num_proc` processes when there are enough of them.

    `advance(n)` hears of every `n` samples done (a progress display)."""
    procs = min(num_proc or default_num_proc(), max(1, len(samples) // 2))
    if procs <= 1 or len(samples) < PARALLEL_MIN_SAMPLES:
        if advance is None:
            return tokenize_chunk(samples, tokenizer, template, settings)
        step = max(1, len(samples) // 50)
        pieces = []
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            pieces.append(tokenize_chunk(chunk, tokenizer, template, settings))
            advance(len(chunk))
        return merge(pieces)
    import multiprocessing

    chunks = procs * CHUNKS_PER_PROCESS
    step = -(-len(samples) // chunks)
    bounds = [(a, min(a + step, len(samples))) for a in range(0, len(samples), step)]
    # fork shares the samples and tokenizer with the workers for free; elsewhere they are pickled.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(procs, _init_worker, (samples, tokenizer, template, settings)) as pool:
        parts = []
        for (start, end), part in zip(bounds, pool.imap(_work, bounds, chunksize=1), strict=True):
            parts.append(part)
            if advance is not None:
                advance(end - start)
    return merge(parts)


def tokenize_chunk(
    samples: Sequence[Sample], tokenizer: Any, template: str | None, settings: TokenizeSettings
) -> TokenizeResult:
    """Tokenize in order; an exception from one sample is that sample's issue, never the chunk's."""
    out: list[TokenizedSample] = []
    result = TokenizeResult(TokenBlock.from_samples([]))
    has_text = any(isinstance(s, TextSample) for s in samples)
    bos = bos_token_id(tokenizer) if has_text else None  # asked once, not per document
    for sample in samples:
        try:
            tokenized = _tokenize_one(sample, tokenizer, template, settings, bos)
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this row, reported with its line
            result.failed.append(RowIssue(sample.source, failure_reason(exc, sample)))
            continue
        for window in tokenized:
            result.truncated += window.truncated
        if isinstance(sample, Conversation) and tokenized[0].num_trained == 0:
            cut = tokenized[0].truncated
            why = "no trained tokens left after truncation" if cut else "no trained tokens"
            result.dropped.append(RowIssue(sample.source, f"{why} (seq_len {settings.seq_len})"))
            continue
        out.extend(tokenized)
    result.block = TokenBlock.from_samples(out)
    return result


def _tokenize_one(
    sample: Sample, tokenizer: Any, template: str | None, settings: TokenizeSettings, bos: int | None
) -> list[TokenizedSample]:
    if isinstance(sample, TextSample):
        return tokenize_text(tokenizer, sample, settings.seq_len, settings.pretrain_overlap, bos)
    return [
        tokenize_conversation(
            tokenizer,
            template or "",
            sample,
            settings.seq_len,
            settings.train_on_prompt,
            mask_history=settings.mask_history,
            reasoning=settings.reasoning,
        )
    ]


def failure_reason(exc: BaseException, sample: Sample) -> str:
    """What went wrong with one row, without repeating its location."""
    from jinja2.exceptions import TemplateError

    text = str(exc).removeprefix(f"{sample.source}: ")
    if isinstance(exc, TemplateError | DataError):
        return f"chat template: {text}"
    if isinstance(exc, RecursionError):
        return "cannot tokenize: nested too deeply (RecursionError)"
    stage = "chat template" if _raised_in_template(exc) else "cannot tokenize"
    reason = f"{stage}: {type(exc).__name__}: {text}"[:2000]
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")  # printable, whatever it holds


def _raised_in_template(exc: BaseException) -> bool:
    """Whether the exception came out of a Jinja template's code rather than the tokenizer."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            return True
        tb = tb.tb_next
    return False


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
