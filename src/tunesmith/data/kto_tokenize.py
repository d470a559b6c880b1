"""KTO rows to token ids: the prompt (never scored) and the completion (scored), kept apart.

The prompt is rendered with the chat template and the generation prompt, exactly what the model
is given at inference; the completion is rendered as the assistant turn after it, and its tokens
are the ones SFT masking would train for it (`trained_char_spans`), the template's end-of-turn
included. The two are kept as separate id lists because KTO also scores each completion after
*another* row's prompt (the mismatched pairs of its KL estimate): the prompt's rendering must be a
prefix of prompt + completion, in text and in tokens, or the split would not be clean, and such a
row is reported, never trained.

`data.seq_len` bounds prompt + completion. A row that is too long loses tokens from the start of
its prompt, never from the completion (a cut answer is not the answer its label judges); if the
completion alone leaves no room for a prompt token, the row is dropped and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.answer_tokens import answer_ids, render_prompt
from tunesmith.data.batch_tokenize import failure_reason
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.kto_formats import KTOSample
from tunesmith.data.tokenize import Reasoning


@dataclass(frozen=True)
class TokenizedKTO:
    """Token ids of a KTO row: the prompt (never scored), then the completion (scored), and its label."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    source: RowRef
    truncated: bool = False  # the prompt lost tokens from its start to fit data.seq_len


class RowDropped(DataError):
    """A valid row that cannot be trained as it is (its completion does not fit `seq_len`)."""


@dataclass
class KTOTokenized:
    examples: list[TokenizedKTO] = field(default_factory=list)
    truncated: int = 0
    dropped: list[RowIssue] = field(default_factory=list)
    failed: list[RowIssue] = field(default_factory=list)


def tokenize_kto_rows(
    samples: Sequence[KTOSample], tokenizer: Any, template: str, seq_len: int, reasoning: Reasoning = "keep"
) -> KTOTokenized:
    """Tokenize in order; whatever goes wrong with one row is that row's issue, with its line."""
    result = KTOTokenized()
    for sample in samples:
        try:
            example = tokenize_kto(tokenizer, template, sample, seq_len, reasoning)
        except RowDropped as exc:
            result.dropped.append(RowIssue(sample.source, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this row, reported with its line
            result.failed.append(RowIssue(sample.source, failure_reason(exc, sample)))  # type: ignore[arg-type]
            continue
        result.truncated += example.truncated
        result.examples.append(example)
    return result


def tokenize_kto(
    tokenizer: Any, template: str, sample: KTOSample, seq_len: int, reasoning: Reasoning = "keep"
) -> TokenizedKTO:
    prompt = render_prompt(tokenizer, template, sample.prompt, sample.tools, reasoning)
    completion = answer_ids(
        tokenizer,
        template,
        sample.prompt,
        sample.completion,
        sample.source,
        sample.tools,
        prompt,
        reasoning,
        name="completion",
    )
    return fit_example(prompt.ids, completion, sample.desirable, sample.source, seq_len)


def fit_example(
    prompt_ids: list[int], completion_ids: list[int], desirable: bool, source: RowRef, seq_len: int
) -> TokenizedKTO:
    """Keep prompt + completion within `seq_len` by cutting the prompt's start, or drop the row."""
    if len(prompt_ids) + len(completion_ids) <= seq_len:
        return TokenizedKTO(prompt_ids, completion_ids, desirable, source)
    room = seq_len - len(completion_ids)
    if room < 1:  # a completion with no prompt token before it cannot be scored from its first token
        raise RowDropped(
            f"completion truncated away by seq_len {seq_len} (the completion has {len(completion_ids)} "
            f"tokens, the prompt {len(prompt_ids)}); raise data.seq_len or shorten the completion"
        )
    return TokenizedKTO(prompt_ids[-room:], completion_ids, desirable, source, truncated=True)


def fit_prompt(prompt_ids: list[int], completion_len: int, seq_len: int) -> list[int]:
    """A prompt cut from its start so that it and a completion of `completion_len` fit `seq_len`.

    Used for the mismatched (KL) sequences, where a prompt meets another row's completion: every
    completion fits `seq_len` with at least one prompt token, so at least one is always left.
    """
    room = max(seq_len - completion_len, 1)
    return prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
