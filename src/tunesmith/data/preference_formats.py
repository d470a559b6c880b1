"""Turn one raw row into a `PreferenceSample`: a prompt and two answers to it, chosen and rejected.

Three layouts are read, each with the message readers and order rules of the chat formats, so a
bad pair is refused with a reason that names the key (`rejected[0].content: empty assistant
message`) instead of training on something else than what the file says:

- `prompt` + `chosen` + `rejected`: the prompt a string (one user message) or OpenAI messages
  ending before the answers; each answer a string or OpenAI messages (assistant, and tool results
  between assistant turns);
- `conversations` + `chosen` + `rejected` (LLaMA-Factory's ranking layout): sharegpt prompt turns,
  each answer one `{"from": "gpt", "value": ...}` turn; optional top-level `system` and `tools`;
- OpenAI preference fine-tuning: `input.messages` (+ `input.tools`), `preferred_output` and
  `non_preferred_output` as arrays of assistant messages.

Per-message `weight` has no meaning in a pair except where it agrees with it: a prompt message is
never trained (weight 1 is refused) and an answer is always scored (weight 0 is refused).

Any layout may carry a top-level numeric `margin` (how much better chosen is, as in Llama 2's reward
model); it is kept on the pair for the methods that use it (reward) and ignored by the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tunesmith.data.conversation import Message, RowRef
from tunesmith.data.formats import (
    DEFAULT_MAX_CHARS,
    RowError,
    Turn,
    as_dict,
    check_order,
    openai_message,
    opt_str,
    req_list,
    req_str,
    sharegpt_turn,
    tools_field,
    type_name,
)
from tunesmith.data.limits import value_problem

PREFERENCE_METHODS = ("dpo", "simpo", "orpo", "reward")
"""Methods that train on preference pairs rather than on single conversations."""

IDENTICAL_NOTE = "chosen and rejected are identical (kept, but the pair expresses no preference)"
_PROMPT_ENDS = ("user", "tool")
_ANSWER_ROLES = ("assistant", "tool")


@dataclass(frozen=True)
class PreferenceSample:
    """A validated pair: the shared prompt, then each answer as the messages that follow it."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: RowRef
    tools: list[dict[str, Any]] | None = None
    margin: float | None = None  # the row's `margin`, if it has one

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected


def to_pair(row: Any, ref: RowRef, *, max_chars: int = DEFAULT_MAX_CHARS) -> PreferenceSample:
    """Convert and validate one preference row, whichever layout it uses; raises `RowError`."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type_name(row)}, expected an object")
    problem = value_problem(row)  # before anything walks the row recursively
    if problem is not None:
        raise RowError(problem)
    if "preferred_output" in row or "non_preferred_output" in row:
        sample = _from_openai(row, ref, max_chars)
    elif "conversations" in row:
        sample = _from_sharegpt(row, ref, max_chars)
    elif "prompt" not in row and "input" in row:
        sample = _from_openai(row, ref, max_chars)
    else:
        sample = _from_prompt(row, ref, max_chars)
    return replace(sample, margin=_margin(row)) if row.get("margin") is not None else sample


def _margin(row: dict[str, Any]) -> float:
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"margin: expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise RowError(f"margin: expected a finite number, got {value}")
    return float(value)


# --- prompt + chosen + rejected -----------------------------------------------------------------


def _from_prompt(row: dict[str, Any], ref: RowRef, max_chars: int) -> PreferenceSample:
    if "prompt" not in row:
        raise RowError('missing key "prompt"')
    value = row["prompt"]
    if isinstance(value, str):
        prompt = [("prompt", Message("user", req_str(row, "prompt", "", max_chars, nonempty=True)))]
    elif isinstance(value, list):
        prompt = _openai_prompt(req_list(row, "prompt"), "prompt", max_chars)
    else:
        got = type_name(value)
        raise RowError(f"prompt: expected a string or an array of messages, got {got}")
    chosen = _openai_answer(row, "chosen", "", max_chars)
    rejected = _openai_answer(row, "rejected", "", max_chars)
    return _pair(prompt, chosen, rejected, ref, tools_field(row))


def _openai_prompt(items: list[Any], key: str, max_chars: int) -> list[Turn]:
    turns = [openai_message(item, f"{key}[{i}]", max_chars) for i, item in enumerate(items)]
    for where, message in turns:
        if message.weight == 1:
            raise RowError(f"{where}.weight: a prompt message is never trained in a preference pair")
    return turns


def _openai_answer(obj: dict[str, Any], key: str, where: str, max_chars: int) -> list[Turn]:
    """An answer given as a string (one assistant message) or as an array of messages."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise RowError(f'{where + ": " if where else ""}missing key "{key}"')
    value = obj[key]
    if isinstance(value, str):
        return [(name, Message("assistant", req_str(obj, key, where, max_chars, nonempty=True)))]
    if not isinstance(value, list):
        raise RowError(f"{name}: expected a string or an array of assistant messages, got {type_name(value)}")
    items = req_list(obj, key, where)
    return [openai_message(item, f"{name}[{i}]", max_chars) for i, item in enumerate(items)]


# --- sharegpt ranking (LLaMA-Factory) -----------------------------------------------------------


def _from_sharegpt(row: dict[str, Any], ref: RowRef, max_chars: int) -> PreferenceSample:
    items = req_list(row, "conversations")
    prompt = [sharegpt_turn(item, f"conversations[{i}]", max_chars) for i, item in enumerate(items)]
    system = opt_str(row, "system", "", max_chars)
    if system and system.strip():
        if prompt[0][1].role == "system":
            raise RowError(f'{prompt[0][0]}: system message given twice (also as top-level "system")')
        prompt.insert(0, ("system", Message("system", system)))
    chosen = [_sharegpt_answer(row, "chosen", max_chars)]
    rejected = [_sharegpt_answer(row, "rejected", max_chars)]
    return _pair(prompt, chosen, rejected, ref, tools_field(row))


def _sharegpt_answer(row: dict[str, Any], key: str, max_chars: int) -> Turn:
    if key not in row:
        raise RowError(f'missing key "{key}"')
    value = row[key]
    if not isinstance(value, dict):
        raise RowError(
            f'{key}: expected a message object {{"from": "gpt", "value": ...}}, got {type_name(value)}'
        )
    return sharegpt_turn(value, key, max_chars)


# --- OpenAI preference fine-tuning --------------------------------------------------------------


def _from_openai(row: dict[str, Any], ref: RowRef, max_chars: int) -> PreferenceSample:
    if "input" not in row:
        raise RowError('missing key "input"')
    given = as_dict(row["input"], "input")
    prompt = _openai_prompt(req_list(given, "messages", "input"), "input.messages", max_chars)
    chosen = _openai_answer(row, "preferred_output", "", max_chars)
    rejected = _openai_answer(row, "non_preferred_output", "", max_chars)
    return _pair(prompt, chosen, rejected, ref, tools_field(given, "input"))


# --- rules for every layout ---------------------------------------------------------------------


def _pair(
    prompt: list[Turn], chosen: list[Turn], rejected: list[Turn], ref: RowRef, tools: Any
) -> PreferenceSample:
    _check_prompt(prompt)
    for answer in (chosen, rejected):
        _check_answer(answer)
        check_order(prompt + answer)
    return PreferenceSample(
        tuple(m for _, m in prompt), tuple(m for _, m in chosen), tuple(m for _, m in rejected), ref, tools
    )


def _check_prompt(prompt: list[Turn]) -> None:
    check_order(prompt)
    where, last = prompt[-1]
    if last.role not in _PROMPT_ENDS:
        raise RowError(
            f"{where}: the prompt must end with a user or tool message (the answers follow it), got {last.role}"
        )


def _check_answer(answer: list[Turn]) -> None:
    """An answer is what the model writes after the prompt: assistant turns, tool results between them."""
    for where, message in answer:
        if message.role not in _ANSWER_ROLES:
            raise RowError(
                f"{where}: an answer holds assistant messages (and tool results), got a {message.role} message"
            )
        if message.weight == 0:
            raise RowError(
                f"{where}.weight: an answer of a preference pair is always scored (weight 0 given)"
            )
    for where, message in (answer[0], answer[-1]):
        if message.role != "assistant":
            raise RowError(
                f"{where}: an answer must start and end with an assistant message, got {message.role}"
            )
