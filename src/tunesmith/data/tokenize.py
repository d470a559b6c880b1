"""Render samples with the chat template and build label masks (-100 = not trained).

Assistant spans are found by rendering prefixes of the conversation with the same template
the model will see at inference: the text between "prompt up to message i with the
generation prompt" and "conversation up to message i" is what the model must produce,
end-of-turn token included. This works for any template that renders prefixes stably,
and is checked, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.conversation import Conversation, RowRef, TextSample
from tunesmith.data.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    source: RowRef
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _is_trained(message_role: str, weight: float | None, train_on_prompt: bool) -> bool:
    if weight is not None:
        return weight > 0
    return train_on_prompt or message_role == "assistant"


def trained_char_spans(
    tokenizer: Any, template: str, conv: Conversation, train_on_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans whose tokens are trained."""
    messages = [m.to_template_dict() for m in conv.messages]
    full = render(tokenizer, template, messages, conv.tools, add_generation_prompt=False)
    if train_on_prompt and all(m.weight is None for m in conv.messages):
        return full, [(0, len(full))]
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(conv.messages):
        if not _is_trained(message.role, message.weight, train_on_prompt):
            continue
        is_assistant = message.role == "assistant"
        before = (
            render(tokenizer, template, messages[:i], conv.tools, add_generation_prompt=is_assistant)
            if i
            else ""
        )
        through = render(tokenizer, template, messages[: i + 1], conv.tools, add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{conv.source}: the chat template does not render conversation prefixes stably, so the "
                f"trained span of message {i} cannot be located; set data.template to a built-in template"
            )
        end = (
            len(through.rstrip()) if is_assistant else len(through)
        )  # keep end-of-turn, drop trailing newline
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def tokenize_conversation(
    tokenizer: Any, template: str, conv: Conversation, seq_len: int, train_on_prompt: bool = False
) -> TokenizedSample:
    text, spans = trained_char_spans(tokenizer, template, conv, train_on_prompt)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[position] = input_ids[position]
    truncated = len(input_ids) > seq_len
    return TokenizedSample(input_ids[:seq_len], labels[:seq_len], conv.source, truncated)


def tokenize_text(tokenizer: Any, sample: TextSample, seq_len: int) -> list[TokenizedSample]:
    """Raw text for continued pretraining: all tokens trained, end with EOS, long texts split into windows."""
    ids = list(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [
        TokenizedSample(ids[start : start + seq_len], ids[start : start + seq_len], sample.source)
        for start in range(0, len(ids), seq_len)
        if len(ids[start : start + seq_len]) > 1
    ]
