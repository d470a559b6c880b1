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
from dataclasses import dataclass, field, replace
from typing import Any

from tunesmith.data.batch_tokenize import failure_reason
from tunesmith.data.conversation import Conversation, RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.kto_formats import KTOSample
from tunesmith.data.tokenize import Reasoning, _template_message, render, trained_char_spans


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
    messages = [_template_message(m, reasoning) for m in sample.prompt]
    prompt_text = render(tokenizer, template, messages, sample.tools, add_generation_prompt=True)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    completion = _completion_ids(tokenizer, template, sample, (prompt_text, prompt_ids), reasoning)
    return fit_example(prompt_ids, completion, sample.desirable, sample.source, seq_len)


def _completion_ids(
    tokenizer: Any, template: str, sample: KTOSample, prompt: tuple[str, list[int]], reasoning: Reasoning
) -> list[int]:
    """The completion's tokens after the prompt, checked to follow exactly the prompt's own tokens."""
    prompt_text, prompt_ids = prompt
    conv = Conversation(
        tuple(replace(m, weight=0.0) for m in sample.prompt)
        + tuple(replace(m, weight=1.0) for m in sample.completion),
        sample.source,
        sample.tools,
    )
    text, spans = trained_char_spans(tokenizer, template, conv, reasoning=reasoning)
    boundary = len(prompt_text)
    if not text.startswith(prompt_text):
        raise DataError(
            "the chat template renders the prompt differently when the completion follows it (the prompt "
            "with the generation prompt is not a prefix of prompt + completion), so the completion cannot "
            "be scored after the prompt the model is given at inference"
        )
    if not spans or spans[0][0] < boundary:
        raise DataError("cannot locate the completion after the prompt in the rendered conversation")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    cut = len(prompt_ids)
    if ids[:cut] != prompt_ids or (cut < len(starts) and starts[cut] < boundary):
        raise DataError(
            "the prompt's tokens change when the completion follows it (a token spans the end of the "
            "prompt and the start of the completion), so prompt and completion cannot be split"
        )
    end = spans[-1][1]
    stop = cut
    while stop < len(starts) and starts[stop] < end:
        stop += 1
    if stop == cut:
        raise DataError("the completion renders to no tokens")
    return ids[cut:stop]


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
