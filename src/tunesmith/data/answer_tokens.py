"""An answer's tokens after its prompt, for the methods that score answers to a shared prompt.

Pairs (dpo, simpo, orpo, reward) and KTO rows both render the prompt alone with the generation
prompt (what the model is given at inference), then prompt + answer, and take the answer's tokens
from the second rendering. That is only right when the prompt's tokens are a prefix of it; any
template or tokenizer for which they are not is refused for the row, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tunesmith.data.conversation import Conversation, Message, RowRef
from tunesmith.data.errors import DataError
from tunesmith.data.tokenize import Reasoning, render, template_message, trained_char_spans


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    ids: list[int]


def render_prompt(
    tokenizer: Any, template: str, prompt: Sequence[Message], tools: Any, reasoning: Reasoning
) -> RenderedPrompt:
    """The prompt as the model sees it at inference: rendered with the generation prompt."""
    messages = [template_message(m, reasoning) for m in prompt]
    text = render(tokenizer, template, messages, tools, add_generation_prompt=True)
    return RenderedPrompt(text, list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def answer_ids(
    tokenizer: Any,
    template: str,
    prompt: Sequence[Message],
    answer: Sequence[Message],
    source: RowRef,
    tools: Any,
    rendered: RenderedPrompt,
    reasoning: Reasoning,
    name: str = "answer",
    label: str = "",
) -> list[int]:
    """The tokens of `answer` after `rendered`, checked to follow exactly the prompt's own tokens.

    `name` ("chosen answer", "completion") and `label` ("chosen: ") word the errors."""
    conv = Conversation(
        tuple(replace(m, weight=0.0) for m in prompt) + tuple(replace(m, weight=1.0) for m in answer),
        source,
        tools,
    )
    text, spans = trained_char_spans(tokenizer, template, conv, reasoning=reasoning)
    boundary = len(rendered.text)
    if not text.startswith(rendered.text):
        raise DataError(
            f"{label}the chat template renders the prompt differently when the {name} follows it (the "
            f"prompt with the generation prompt is not a prefix of prompt + {name}), so the {name} cannot "
            "be scored after the prompt the model is given at inference"
        )
    if not spans or spans[0][0] < boundary:
        raise DataError(f"{label}cannot locate the {name} after the prompt in the rendered conversation")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    cut = len(rendered.ids)
    if ids[:cut] != rendered.ids or (cut < len(starts) and starts[cut] < boundary):
        raise DataError(
            f"{label}the prompt's tokens change when the {name} follows it (a token spans the end of the "
            f"prompt and the start of the {name}), so prompt and {name} cannot be split"
        )
    end = spans[-1][1]
    stop = cut
    while stop < len(starts) and starts[stop] < end:
        stop += 1
    if stop == cut:
        raise DataError(f"{label}the {name} renders to no tokens")
    return ids[cut:stop]
