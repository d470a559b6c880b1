"""Turn one raw row into a `KTOSample`: a prompt, one completion, and whether the completion is good.

KTO (method: kto) trains on single completions labelled desirable or undesirable, not on pairs.
Two layouts are read, with the message readers and order rules of the chat formats, so a bad row
is refused with a reason that names the key instead of being trained as something it is not:

- `prompt` + `completion` + `label` (TRL's unpaired layout): the prompt a string (one user message)
  or OpenAI messages ending before the answer; the completion a string (one assistant message) or
  OpenAI messages (assistant turns, tool results between them);
- `messages` + `label`: an OpenAI conversation ending with the assistant answer the label judges.

`label` is a JSON boolean: true (desirable) or false (undesirable). A CSV file holds only text, so
there the words true and false are read as booleans. Anything else is refused: a label of 1, "yes"
or null is more likely a broken export than a decision, and a wrong label trains the wrong way.

Per-message `weight` agrees with KTO or is refused: a prompt message is never trained (weight 1),
a completion always is (weight 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.data.conversation import Message, RowRef
from tunesmith.data.formats import (
    DEFAULT_MAX_CHARS,
    RowError,
    Turn,
    check_order,
    detect_format,
    openai_message,
    req_list,
    req_str,
    tools_field,
    type_name,
)
from tunesmith.data.limits import value_problem

KTO_FORMAT = "kto"
KTO_KEYS = "prompt + completion + label, or messages + label"
"""The keys of the KTO layouts, for messages that list them."""

_MARKERS = ("label", "completion")
_PROMPT_ENDS = ("user", "tool")
_ANSWER_ROLES = ("assistant", "tool")
_CSV_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class KTOSample:
    """A validated KTO row: the prompt, the completion that follows it, and its label."""

    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    desirable: bool
    source: RowRef
    tools: list[dict[str, Any]] | None = None


def is_kto_row(row: dict[str, Any]) -> bool:
    """Whether a row carries a KTO label or completion (what is missing is reported later)."""
    return any(key in row for key in _MARKERS)


def other_kind(row: dict[str, Any]) -> str | None:
    """What a row that is not a KTO row looks like, for the message that refuses its file."""
    fmt = detect_format(row)
    if fmt == "preference":
        return "preference pairs (chosen/rejected), which train with method dpo, simpo, orpo or reward"
    if fmt == "text":
        return "raw text rows, which train with method pretrain"
    if fmt is not None:
        return f"{fmt} rows without a label, which train with method sft"
    return None


def to_kto(row: Any, ref: RowRef, *, max_chars: int = DEFAULT_MAX_CHARS) -> KTOSample:
    """Convert and validate one KTO row, whichever layout it uses; raises `RowError`."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type_name(row)}, expected an object")
    problem = value_problem(row)  # before anything walks the row recursively
    if problem is not None:
        raise RowError(problem)
    if "messages" in row and ("prompt" in row or "completion" in row):
        raise RowError(
            "give either messages + label or prompt + completion + label, not both "
            f"(this row has {', '.join(k for k in ('messages', 'prompt', 'completion') if k in row)})"
        )
    desirable = _label(row, ref)
    if "messages" in row:
        prompt, completion = _from_messages(row, max_chars)
    else:
        prompt, completion = _from_prompt(row, max_chars)
    _check_prompt(prompt)
    _check_completion(completion)
    check_order(prompt + completion)
    return KTOSample(
        tuple(m for _, m in prompt), tuple(m for _, m in completion), desirable, ref, tools_field(row)
    )


def _label(row: dict[str, Any], ref: RowRef) -> bool:
    if "label" not in row:
        raise RowError('missing key "label" (true: a desirable completion, false: an undesirable one)')
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and ref.file.lower().endswith(".csv"):
        parsed = _CSV_BOOLEANS.get(value.strip().lower())
        if parsed is not None:
            return parsed
    raise RowError(f"label: expected true (desirable) or false (undesirable), got {_shown(value)}")


def _shown(value: Any) -> str:
    """A scalar as it is written in the file; anything bigger by its JSON type."""
    if value is None or isinstance(value, str | int | float):
        return json.dumps(value[:40] if isinstance(value, str) else value)
    return type_name(value)


def _from_prompt(row: dict[str, Any], max_chars: int) -> tuple[list[Turn], list[Turn]]:
    if "prompt" not in row:
        raise RowError('missing key "prompt"')
    value = row["prompt"]
    if isinstance(value, str):
        prompt = [("prompt", Message("user", req_str(row, "prompt", "", max_chars, nonempty=True)))]
    elif isinstance(value, list):
        prompt = _prompt_turns(req_list(row, "prompt"), "prompt", max_chars)
    else:
        raise RowError(f"prompt: expected a string or an array of messages, got {type_name(value)}")
    if "completion" not in row:
        raise RowError('missing key "completion"')
    answer = row["completion"]
    if isinstance(answer, str):
        text = req_str(row, "completion", "", max_chars, nonempty=True)
        return prompt, [("completion", Message("assistant", text))]
    if not isinstance(answer, list):
        got = type_name(answer)
        raise RowError(f"completion: expected a string or an array of assistant messages, got {got}")
    items = req_list(row, "completion")
    return prompt, [openai_message(item, f"completion[{i}]", max_chars) for i, item in enumerate(items)]


def _from_messages(row: dict[str, Any], max_chars: int) -> tuple[list[Turn], list[Turn]]:
    """All messages but the last are the prompt; the last is the answer the label judges."""
    items = req_list(row, "messages")
    turns = [openai_message(item, f"messages[{i}]", max_chars) for i, item in enumerate(items)]
    where, last = turns[-1]
    if last.role != "assistant":
        raise RowError(
            f"{where}: the messages of a KTO row end with the assistant answer the label judges, "
            f"got a {last.role} message"
        )
    if len(turns) == 1:
        raise RowError("messages: only an assistant message; a KTO row needs the prompt it answers")
    for where, message in turns[:-1]:
        if message.weight == 1:
            raise RowError(f"{where}.weight: only the last message (the answer) is trained in a KTO row")
    return turns[:-1], turns[-1:]


def _prompt_turns(items: list[Any], key: str, max_chars: int) -> list[Turn]:
    turns = [openai_message(item, f"{key}[{i}]", max_chars) for i, item in enumerate(items)]
    for where, message in turns:
        if message.weight == 1:
            raise RowError(f"{where}.weight: a prompt message is never trained in a KTO row")
    return turns


def _check_prompt(prompt: list[Turn]) -> None:
    check_order(prompt)
    where, last = prompt[-1]
    if last.role not in _PROMPT_ENDS:
        raise RowError(
            f"{where}: the prompt must end with a user or tool message (the completion follows it), "
            f"got {last.role}"
        )


def _check_completion(completion: list[Turn]) -> None:
    """What the model writes after the prompt: assistant turns, tool results between them."""
    for where, message in completion:
        if message.role not in _ANSWER_ROLES:
            raise RowError(
                f"{where}: a completion holds assistant messages (and tool results), got a {message.role} message"
            )
        if message.weight == 0:
            raise RowError(f"{where}.weight: the completion of a KTO row is always trained (weight 0 given)")
    for where, message in (completion[0], completion[-1]):
        if message.role != "assistant":
            raise RowError(
                f"{where}: a completion must start and end with an assistant message, got {message.role}"
            )
