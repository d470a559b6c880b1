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

from tunesmith.data.answer_tokens import answer_ids, render_prompt
from tunesmith.data.batch_tokenize import failure_reason
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.preference_formats import PreferenceSample
from tunesmith.data.tokenize import Reasoning


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
    prompt = render_prompt(tokenizer, template, sample.prompt, sample.tools, reasoning)
    chosen, rejected = (
        answer_ids(
            tokenizer,
            template,
            sample.prompt,
            answer,
            sample.source,
            sample.tools,
            prompt,
            reasoning,
            name=f"{key} answer",
            label=f"{key}: ",
        )
        for key, answer in (("chosen", sample.chosen), ("rejected", sample.rejected))
    )
    pair = fit_pair(prompt.ids, chosen, rejected, sample.source, seq_len)
    return replace(pair, margin=sample.margin) if sample.margin is not None else pair


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
