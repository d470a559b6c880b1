"""Turn one raw row (a dict from `sources`) into a `Conversation` or `TextSample`.

Each format is checked strictly enough that a row which would train badly (no assistant turn,
two assistant turns in a row, an unknown role, an empty answer, ...) is refused here with a reason
that names the field, instead of failing or silently mis-training later. A bad row raises
`RowError(reason)`; the caller attaches the file and line.

Optional keys that are present but null count as absent: Parquet fills a struct field a row does
not have with null, and such rows must read the same as their JSON Lines twin.

Preference pairs (format "preference") are detected here but converted by `preference_formats`,
which builds them from the same message readers and rules; `to_sample` refuses them, because a
pair is not one conversation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tunesmith.data.conversation import ROLES, Conversation, Message, RowRef, Sample, TextSample
from tunesmith.data.limits import TooDeep, loads_bounded, too_deep_reason, value_problem

FORMATS = ("alpaca", "sharegpt", "messages", "text")
DEFAULT_MAX_CHARS = 10_000_000
"""Longest string accepted in one field (characters); longer is almost always a broken row."""

PAIR_FORMAT = "preference"
KTO_FORMAT = "kto"
"""Rows of method kto (read by data/kto_formats.py); detected here only to refuse them elsewhere."""
OTHER_METHOD_FORMATS = {KTO_FORMAT: "kto", "prompts": "grpo"}
"""Formats that belong to one method, and that method."""
PAIR_KEYS = (
    "prompt + chosen + rejected, conversations + chosen + rejected, "
    "or input + preferred_output + non_preferred_output"
)
"""The keys of the preference layouts (`preference_formats`), for messages that list them."""
_PAIR_MARKERS = ("chosen", "rejected", "preferred_output", "non_preferred_output")
PAIR_REASON = (
    "a preference pair (chosen/rejected), not a conversation: "
    "train it with a preference method (dpo, simpo, orpo or reward)"
)

FORMAT_KEYS = {
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction + output",
    "text": "text",
}
"""The keys that identify each format, in the order `detect_format` tries them."""

_OPENAI_ROLES = {r: r for r in ROLES} | {"developer": "system", "function": "tool"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
_SHAREGPT_SHOWN = "human, user, gpt, assistant, model, system, tool, function, observation"
_NEEDS_CONTENT = ("user", "assistant")


class RowError(ValueError):
    """A row that cannot become a sample; `reason` names the field and what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_preference_row(row: dict[str, Any]) -> bool:
    """Whether a row carries the answers of a preference pair (a missing half is reported later)."""
    return any(row.get(key) is not None for key in _PAIR_MARKERS)


def is_kto_row(row: dict[str, Any]) -> bool:
    """A completion labelled good or bad (method kto's rows): never train on it as a conversation,
    since half of the answers are the ones to avoid."""
    return isinstance(row.get("label"), bool) and (
        row.get("messages") is not None or row.get("completion") is not None
    )


def detect_format(row: dict[str, Any], pairs: bool = False) -> str | None:
    """The format a row's keys point to (messages > pair keys > conversations > instruction/output > text).

    `pairs`: the caller trains on preference pairs, so only a pair counts. Otherwise a row with
    `messages` is a conversation even when it also holds a pair (UltraFeedback-style rows carry both),
    and a row with pair keys only is detected as "preference" so that the caller can refuse the file
    with one clear message rather than every row with a wrong one.
    """
    if pairs:
        return PAIR_FORMAT if is_preference_row(row) else None
    if is_kto_row(row):
        return KTO_FORMAT
    if row.get("messages") is not None:
        return "messages"
    if is_preference_row(row):
        return PAIR_FORMAT
    if row.get("conversations") is not None:
        return "sharegpt"
    if row.get("instruction") is not None and row.get("output") is not None:
        return "alpaca"
    if row.get("text") is not None:
        return "text"
    return None


def to_sample(row: dict[str, Any], fmt: str, ref: RowRef, *, max_chars: int = DEFAULT_MAX_CHARS) -> Sample:
    """Convert and validate one row; raises `RowError` for a bad row, ValueError for a bad `fmt`."""
    if fmt == PAIR_FORMAT:
        raise RowError(PAIR_REASON)
    convert = _CONVERTERS.get(fmt)
    if convert is None:
        raise ValueError(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
    if not isinstance(row, dict):
        raise RowError(f"row is {type_name(row)}, expected an object")
    problem = value_problem(row)  # before any recursive use of the row (templates, pickling)
    if problem is not None:
        raise RowError(problem)
    return convert(row, ref, max_chars)


def type_name(value: Any) -> str:
    """JSON's name for a parsed value, so messages match what the user sees in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- field helpers ------------------------------------------------------------------------------


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_len(value: str, where: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise RowError(f"{where}: field too long ({len(value):,} characters; limit {max_chars:,})")
    return value


def opt_str(obj: dict[str, Any], key: str, where: str, max_chars: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"{_at(where, key)}: expected a string, got {type_name(value)}")
    return _check_len(value, _at(where, key), max_chars)


def req_str(obj: dict[str, Any], key: str, where: str, max_chars: int, *, nonempty: bool) -> str:
    if key not in obj:
        raise RowError(f'{where + ": " if where else ""}missing key "{key}"')
    value = opt_str(obj, key, where, max_chars)
    if value is None:
        raise RowError(f"{_at(where, key)}: expected a string, got null")
    if nonempty and not value.strip():
        raise RowError(f"{_at(where, key)}: empty")
    return value


def req_list(obj: dict[str, Any], key: str, where: str = "") -> list[Any]:
    if key not in obj:
        raise RowError(f'{where + ": " if where else ""}missing key "{key}"')
    value = obj[key]
    if not isinstance(value, list):
        raise RowError(f"{_at(where, key)}: expected an array, got {type_name(value)}")
    if not value:
        raise RowError(f"{_at(where, key)}: empty array")
    return value


def as_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowError(f"{where}: expected an object, got {type_name(value)}")
    return value


def _weight(obj: dict[str, Any], where: str) -> float | None:
    value = obj.get("weight")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        shown = json.dumps(value) if isinstance(value, str | bool) else value
        raise RowError(f"{where}.weight: must be 0 or 1, got {shown}")
    return float(value)


def tools_field(row: dict[str, Any], where: str = "") -> list[dict[str, Any]] | None:
    """Tool schemas: an array of objects, or that array as a JSON string (LLaMA-Factory style)."""
    value = row.get("tools")
    if value is None:
        return None
    key = _at(where, "tools")
    if isinstance(value, str):
        if not value.strip():
            return None
        value = _embedded_json(value, key)
    if not isinstance(value, list):
        raise RowError(f"{key}: expected an array, got {type_name(value)}")
    for i, tool in enumerate(value):
        as_dict(tool, f"{key}[{i}]")
    return value or None


def _embedded_json(text: str, where: str) -> Any:
    """A JSON value stored as a string, held to the same limits as the row itself."""
    try:
        value = loads_bounded(text)
    except TooDeep:
        raise RowError(too_deep_reason(where)) from None
    except json.JSONDecodeError as e:
        raise RowError(f"{where}: invalid JSON string: {e.msg}") from None
    problem = value_problem(value, where)
    if problem is not None:
        raise RowError(problem)
    return value


def _check_arguments(call: dict[str, Any], where: str) -> None:
    """Tool-call arguments given as a JSON string are decoded for the template: bound them now.

    Arguments that are not JSON at all are rendered as the string they are, so they pass.
    """
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return
    where = f"{where}.function.arguments"
    try:
        value = loads_bounded(arguments)
    except TooDeep:
        raise RowError(too_deep_reason(where)) from None
    except json.JSONDecodeError:
        return
    problem = value_problem(value, where)
    if problem is not None:
        raise RowError(problem)


# --- conversation rules -------------------------------------------------------------------------

Turn = tuple[str, Message]
"""A message and the path that names it in the row (`messages[2]`)."""


def check_order(turns: list[Turn]) -> None:
    """Order rules for any run of messages: system first, no two user or assistant turns in a row."""
    for i, (where, msg) in enumerate(turns):
        if msg.role == "system" and i > 0:
            raise RowError(f"{where}: system message must come first")
        if msg.role in _NEEDS_CONTENT and i > 0 and turns[i - 1][1].role == msg.role:
            prev = turns[i - 1][0]
            raise RowError(f"{where}: two {msg.role} messages in a row ({prev} and {where})")


def _check_turns(turns: list[Turn], key: str) -> None:
    """Rules every conversation must follow to be trainable, whatever its source format."""
    check_order(turns)
    assistants = [m for _, m in turns if m.role == "assistant"]
    if not assistants:
        raise RowError(f"{key}: no assistant message (nothing to train on)")
    trained = any(m.weight == 1 for _, m in turns) or any(m.weight is None for m in assistants)
    if not trained:
        raise RowError(f"{key}: every assistant message has weight 0 (nothing to train on)")


def _check_content(role: str, content: str, has_tool_calls: bool, where: str) -> None:
    if role in _NEEDS_CONTENT and not content.strip() and not has_tool_calls:
        raise RowError(f"{where}: empty {role} message")


# --- messages (OpenAI) --------------------------------------------------------------------------


def _from_messages(row: dict[str, Any], ref: RowRef, max_chars: int) -> Conversation:
    items = req_list(row, "messages")
    turns = [openai_message(item, f"messages[{i}]", max_chars) for i, item in enumerate(items)]
    tools = tools_field(row)
    _check_turns(turns, "messages")
    return Conversation(tuple(m for _, m in turns), ref, tools)


def openai_message(item: Any, where: str, max_chars: int) -> Turn:
    obj = as_dict(item, where)
    raw_role = req_str(obj, "role", where, max_chars, nonempty=False)
    role = _OPENAI_ROLES.get(raw_role)
    if role is None:
        allowed = ", ".join(ROLES)
        raise RowError(f'{where}.role: unknown role "{raw_role}" (allowed: {allowed})')
    tool_calls = _tool_calls(obj, role, where)
    content = _openai_content(obj, where, max_chars, may_be_null=bool(tool_calls))
    _check_content(role, content, bool(tool_calls), f"{where}.content")
    name = opt_str(obj, "name", where, max_chars)
    return where, Message(role, content, _weight(obj, where), tool_calls, name)


def _tool_calls(obj: dict[str, Any], role: str, where: str) -> list[dict[str, Any]] | None:
    value = obj.get("tool_calls")
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError(f"{where}.tool_calls: expected an array, got {type_name(value)}")
    if value and role != "assistant":
        raise RowError(f"{where}.tool_calls: only assistant messages can have tool_calls")
    for i, call in enumerate(value):
        _check_arguments(as_dict(call, f"{where}.tool_calls[{i}]"), f"{where}.tool_calls[{i}]")
    return value or None


def _openai_content(obj: dict[str, Any], where: str, max_chars: int, *, may_be_null: bool) -> str:
    """A string, or an array of text parts joined by newlines (as OpenAI-style servers do)."""
    if "content" not in obj and not may_be_null:
        raise RowError(f'{where}: missing key "content"')
    value = obj.get("content")
    if value is None:
        if may_be_null:
            return ""
        raise RowError(f"{where}.content: expected a string, got null")
    if isinstance(value, str):
        return _check_len(value, f"{where}.content", max_chars)
    if isinstance(value, list):
        parts = [_text_part(p, f"{where}.content[{i}]", max_chars) for i, p in enumerate(value)]
        return _check_len("\n".join(parts), f"{where}.content", max_chars)
    got = type_name(value)
    raise RowError(f"{where}.content: expected a string or an array of text parts, got {got}")


def _text_part(part: Any, where: str, max_chars: int) -> str:
    obj = as_dict(part, where)
    kind = obj.get("type")
    if kind != "text":
        shown = json.dumps(kind) if isinstance(kind, str) else type_name(kind)
        raise RowError(f'{where}.type: unsupported content part {shown} (only "text" parts are supported)')
    return req_str(obj, "text", where, max_chars, nonempty=False)


# --- sharegpt -----------------------------------------------------------------------------------


def _from_sharegpt(row: dict[str, Any], ref: RowRef, max_chars: int) -> Conversation:
    items = req_list(row, "conversations")
    turns = [sharegpt_turn(item, f"conversations[{i}]", max_chars) for i, item in enumerate(items)]
    system = opt_str(row, "system", "", max_chars)
    if system and system.strip():
        if turns[0][1].role == "system":
            raise RowError(f'{turns[0][0]}: system message given twice (also as top-level "system")')
        turns.insert(0, ("system", Message("system", system)))
    tools = tools_field(row)
    _check_turns(turns, "conversations")
    return Conversation(tuple(m for _, m in turns), ref, tools)


def sharegpt_turn(item: Any, where: str, max_chars: int) -> Turn:
    obj = as_dict(item, where)
    speaker = req_str(obj, "from", where, max_chars, nonempty=False)
    role = _SHAREGPT_ROLES.get(speaker)
    if role is None:
        raise RowError(f'{where}.from: unknown role "{speaker}" (allowed: {_SHAREGPT_SHOWN})')
    value = req_str(obj, "value", where, max_chars, nonempty=False)
    _check_content(role, value, False, f"{where}.value")
    return where, Message(role, value, _weight(obj, where))


# --- alpaca -------------------------------------------------------------------------------------


def _from_alpaca(row: dict[str, Any], ref: RowRef, max_chars: int) -> Conversation:
    instruction = req_str(row, "instruction", "", max_chars, nonempty=True)
    extra = opt_str(row, "input", "", max_chars)
    output = req_str(row, "output", "", max_chars, nonempty=True)
    system = opt_str(row, "system", "", max_chars)
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    messages = [Message("system", system)] if system and system.strip() else []
    messages += _alpaca_history(row, max_chars)
    messages += [
        Message("user", _check_len(user, "instruction + input", max_chars)),
        Message("assistant", output),
    ]
    return Conversation(tuple(messages), ref)


def _alpaca_history(row: dict[str, Any], max_chars: int) -> list[Message]:
    """Earlier turns as `[[user, assistant], ...]` (the LLaMA-Factory alpaca extension)."""
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowError(f"history: expected an array of [user, assistant] pairs, got {type_name(history)}")
    out: list[Message] = []
    for i, pair in enumerate(history):
        where = f"history[{i}]"
        ok = isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)
        if not ok:
            raise RowError(f"{where}: expected a [user, assistant] pair of strings")
        for role, text in zip(("user", "assistant"), pair, strict=True):
            _check_content(role, _check_len(text, where, max_chars), False, where)
            out.append(Message(role, text))
    return out


# --- text ---------------------------------------------------------------------------------------


def _from_text(row: dict[str, Any], ref: RowRef, max_chars: int) -> TextSample:
    return TextSample(req_str(row, "text", "", max_chars, nonempty=True), ref)


_CONVERTERS: dict[str, Callable[[dict[str, Any], RowRef, int], Sample]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "text": _from_text,
}
