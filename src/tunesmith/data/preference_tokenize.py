"""Preference pairs to token ids: one shared prompt, and each answer's completion tokens.

The prompt is rendered once with the chat template and the generation prompt, exactly what the
model is given at inference. Each answer is rendered as the whole conversation (prompt + answer);
the prompt's rendering must be a prefix of both, in text and in tokens, or chosen and rejected
would not be scored after the same prompt: such a row is reported, never trained. An answer's
completion tokens are the ones SFT masking would train for it (`trained_char_spans`, the answer's
messages trained, the prompt's not), the template's end-of-turn included; an answer of several
messages (assistant, tool result, assistant) is one completion from the end of the prompt to the
end of its last turn.

`data.seq_len` bounds the prompt plus the longer answer. A pair that is too long loses tokens from
the start of its prompt, never from an answer; if the answers alone leave no room for a prompt
token, the pair is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tunesmith.data.batch_tokenize import failure_reason
from tunesmith.data.conversation import Conversation, Message, RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.preference_formats import PreferenceSample
from tunesmith.data.tokenize import Reasoning, _template_message, render, trained_char_spans


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: the prompt (never scored), then each answer's completion (scored)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: RowRef
    truncated: bool = False  # the prompt lost tokens from its start to fit data.seq_len
    margin: float | None = None  # the row's `margin` (reward models), passed through


class PairDropped(DataError):
    """A valid pair that cannot be trained as it is (its answers do not fit `seq_len`)."""


@dataclass
class PairsResult:
    pairs: list[TokenizedPair] = field(default_factory=list)
    truncated: int = 0
    dropped: list[RowIssue] = field(default_factory=list)
    failed: list[RowIssue] = field(default_factory=list)


def tokenize_pairs(
    samples: Sequence[PreferenceSample],
    tokenizer: Any,
    template: str,
    seq_len: int,
    reasoning: Reasoning = "keep",
) -> PairsResult:
    """Tokenize in order; whatever goes wrong with one pair is that pair's issue, with its line."""
    result = PairsResult()
    for sample in samples:
        try:
            pair = tokenize_pair(tokenizer, template, sample, seq_len, reasoning)
        except PairDropped as exc:
            result.dropped.append(RowIssue(sample.source, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this row, reported with its line
            result.failed.append(RowIssue(sample.source, failure_reason(exc, sample)))  # type: ignore[arg-type]
            continue
        result.truncated += pair.truncated
        result.pairs.append(pair)
    return result


def tokenize_pair(
    tokenizer: Any, template: str, sample: PreferenceSample, seq_len: int, reasoning: Reasoning = "keep"
) -> TokenizedPair:
    messages = [_template_message(m, reasoning) for m in sample.prompt]
    prompt_text = render(tokenizer, template, messages, sample.tools, add_generation_prompt=True)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    chosen, rejected = (
        _completion_ids(tokenizer, template, sample, answer, key, (prompt_text, prompt_ids), reasoning)
        for key, answer in (("chosen", sample.chosen), ("rejected", sample.rejected))
    )
    pair = fit_pair(prompt_ids, chosen, rejected, sample.source, seq_len)
    return replace(pair, margin=sample.margin) if sample.margin is not None else pair


def _completion_ids(
    tokenizer: Any,
    template: str,
    sample: PreferenceSample,
    answer: tuple[Message, ...],
    key: str,
    prompt: tuple[str, list[int]],
    reasoning: Reasoning,
) -> list[int]:
    """The answer's tokens after the prompt, checked to follow exactly the shared prompt's tokens."""
    prompt_text, prompt_ids = prompt
    conv = Conversation(
        tuple(replace(m, weight=0.0) for m in sample.prompt) + tuple(replace(m, weight=1.0) for m in answer),
        sample.source,
        sample.tools,
    )
    text, spans = trained_char_spans(tokenizer, template, conv, reasoning=reasoning)
    boundary = len(prompt_text)
    if not text.startswith(prompt_text):
        raise DataError(
            f"{key}: the chat template renders the prompt differently when the {key} answer follows it "
            f"(the prompt with the generation prompt is not a prefix of prompt + {key}), so the two "
            f"answers would not share one prompt"
        )
    if not spans or spans[0][0] < boundary:
        raise DataError(f"{key}: cannot locate the answer after the prompt in the rendered conversation")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    cut = len(prompt_ids)
    if ids[:cut] != prompt_ids or (cut < len(starts) and starts[cut] < boundary):
        raise DataError(
            f"{key}: the prompt's tokens change when the {key} answer follows it (a token spans the end "
            f"of the prompt and the start of the answer), so the two answers would not share one prompt"
        )
    end = spans[-1][1]
    stop = cut
    while stop < len(starts) and starts[stop] < end:
        stop += 1
    if stop == cut:
        raise DataError(f"{key}: the answer renders to no tokens")
    return ids[cut:stop]


def fit_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], source: RowRef, seq_len: int
) -> TokenizedPair:
    """Keep prompt + longer answer within `seq_len` by cutting the prompt's start, or drop the pair."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= seq_len:
        return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, source)
    room = seq_len - longest
    if room < 1:  # an answer with no prompt token before it cannot be scored from its first token
        raise PairDropped(
            f"answer truncated away by seq_len {seq_len} (the longer answer has {longest} tokens, "
            f"the prompt {len(prompt_ids)})"
        )
    return TokenizedPair(prompt_ids[-room:], chosen_ids, rejected_ids, source, truncated=True)
