"""Row -> sample conversion: every format, and the exact reason each kind of bad row gets."""

from __future__ import annotations

from typing import Any

import pytest

from tunesmith.data.conversation import Conversation, Message, RowRef, TextSample
from tunesmith.data.formats import RowError, detect_format, to_sample

REF = RowRef("train.jsonl", 7)


def _roles(sample: Any) -> list[tuple[str, str]]:
    assert isinstance(sample, Conversation)
    return [(m.role, m.content) for m in sample.messages]


def _reason(row: dict[str, Any], fmt: str, **kw: Any) -> str:
    with pytest.raises(RowError) as info:
        to_sample(row, fmt, REF, **kw)
    return info.value.reason


def _chat(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [], "conversations": [], "text": "x"}, "messages"),
        ({"conversations": [], "instruction": "a", "output": "b"}, "sharegpt"),
        ({"instruction": "a", "output": "b", "text": "t"}, "alpaca"),
        ({"instruction": "a", "text": "t"}, "text"),
        ({"text": "t"}, "text"),
        ({"instruction": "a"}, None),
        ({"prompt": "a", "completion": "b"}, None),
        ({"messages": None, "text": "t"}, "text"),
        ({}, None),
    ],
)
def test_detect_format_priority(row: dict[str, Any], expected: str | None) -> None:
    assert detect_format(row) == expected


# --- alpaca -------------------------------------------------------------------------------------


def test_alpaca_joins_instruction_and_input_and_adds_system() -> None:
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."}
    sample = to_sample(row, "alpaca", REF)
    assert _roles(sample) == [("system", "Be brief."), ("user", "Translate\n\nchat"), ("assistant", "cat")]
    assert sample.source == REF


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  "}, {"input": None}, {"system": ""}])
def test_alpaca_without_input_uses_instruction_alone(extra: dict[str, Any]) -> None:
    sample = to_sample({"instruction": "Say hi", "output": "hi", **extra}, "alpaca", REF)
    assert _roles(sample) == [("user", "Say hi"), ("assistant", "hi")]


def test_alpaca_history_becomes_earlier_turns() -> None:
    row = {"instruction": "and 3?", "output": "4", "history": [["1+1?", "2"]]}
    assert _roles(to_sample(row, "alpaca", REF)) == [
        ("user", "1+1?"),
        ("assistant", "2"),
        ("user", "and 3?"),
        ("assistant", "4"),
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"output": "b"}, 'missing key "instruction"'),
        ({"instruction": "a"}, 'missing key "output"'),
        ({"instruction": "", "output": "b"}, "instruction: empty"),
        ({"instruction": "a", "output": "  \n"}, "output: empty"),
        ({"instruction": 3, "output": "b"}, "instruction: expected a string, got a number"),
        ({"instruction": "a", "output": None}, "output: expected a string, got null"),
        ({"instruction": "a", "output": "b", "input": ["x"]}, "input: expected a string, got an array"),
        ({"instruction": "a", "output": "b", "system": True}, "system: expected a string, got a boolean"),
        (
            {"instruction": "a", "output": "b", "history": [["q"]]},
            "history[0]: expected a [user, assistant] pair",
        ),
        ({"instruction": "a", "output": "b", "history": [["q", ""]]}, "history[0]: empty assistant message"),
    ],
)
def test_alpaca_bad_rows(row: dict[str, Any], reason: str) -> None:
    assert _reason(row, "alpaca").startswith(reason)


# --- sharegpt -----------------------------------------------------------------------------------


def test_sharegpt_maps_speakers_to_roles() -> None:
    row = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "w"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
            {"from": "user", "value": "thanks"},
            {"from": "model", "value": "welcome"},
        ],
    }
    assert [r for r, _ in _roles(to_sample(row, "sharegpt", REF))] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]


def test_sharegpt_system_turn_is_kept() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert _roles(to_sample(row, "sharegpt", REF)) == [("system", "s"), ("user", "q"), ("assistant", "a")]


def _sg(*turns: tuple[str, Any]) -> dict[str, Any]:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"conversations": "hi"}, "conversations: expected an array, got a string"),
        ({"conversations": []}, "conversations: empty array"),
        ({"conversation": []}, 'missing key "conversations"'),
        (
            _sg(("human", "q"), ("bot", "a")),
            'conversations[1].from: unknown role "bot" (allowed: human, user, gpt, assistant, model, system, tool, function, observation)',
        ),
        (_sg(("human", "q"), ("gpt", 5)), "conversations[1].value: expected a string, got a number"),
        ({"conversations": [{"from": "human"}]}, 'conversations[0]: missing key "value"'),
        ({"conversations": [["human", "q"]]}, "conversations[0]: expected an object, got an array"),
        (_sg(("human", "q"), ("gpt", "")), "conversations[1].value: empty assistant message"),
        (
            _sg(("human", "q"), ("human", "q2")),
            "conversations[1]: two user messages in a row (conversations[0] and conversations[1])",
        ),
        (_sg(("human", "q")), "conversations: no assistant message (nothing to train on)"),
        (
            _sg(("human", "q"), ("gpt", "a"), ("system", "s")),
            "conversations[2]: system message must come first",
        ),
        (
            {"system": "top", **_sg(("system", "s"), ("human", "q"), ("gpt", "a"))},
            'conversations[0]: system message given twice (also as top-level "system")',
        ),
    ],
)
def test_sharegpt_bad_rows(row: dict[str, Any], reason: str) -> None:
    assert _reason(row, "sharegpt") == reason


# --- messages (OpenAI) --------------------------------------------------------------------------


def test_messages_keep_weight_tools_and_tool_calls() -> None:
    call = {"type": "function", "function": {"name": "w", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "w"}}]
    row = {
        "tools": tools,
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny", "name": "w"},
            {"role": "assistant", "content": "It is sunny.", "weight": 1},
        ],
    }
    sample = to_sample(row, "messages", REF)
    assert isinstance(sample, Conversation)
    assert sample.tools == tools
    assert sample.messages[2] == Message("assistant", "draft", 0.0)
    assert sample.messages[4] == Message("assistant", "", None, [call])
    assert sample.messages[5].name == "w"
    assert sample.messages[6].weight == 1.0


def test_messages_text_parts_are_joined_and_aliases_mapped() -> None:
    row = {
        "messages": [
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]
    }
    assert _roles(to_sample(row, "messages", REF)) == [("system", "d"), ("user", "a\nb"), ("assistant", "c")]


def test_tools_as_json_string_are_parsed() -> None:
    row = {**_chat(("user", "q"), ("assistant", "a")), "tools": '[{"name": "w"}]'}
    sample = to_sample(row, "messages", REF)
    assert isinstance(sample, Conversation)
    assert sample.tools == [{"name": "w"}]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            _chat(("user", "q"), ("bot", "a")),
            'messages[1].role: unknown role "bot" (allowed: system, user, assistant, tool)',
        ),
        (_chat(("user", "q"), (None, "a")), "messages[1].role: expected a string, got null"),
        ({"messages": [{"content": "q"}]}, 'messages[0]: missing key "role"'),
        ({"messages": [{"role": "user"}]}, 'messages[0]: missing key "content"'),
        ({"messages": ["hi"]}, "messages[0]: expected an object, got a string"),
        ({"messages": {"role": "user"}}, "messages: expected an array, got an object"),
        (_chat(("user", ""), ("assistant", "a")), "messages[0].content: empty user message"),
        (_chat(("user", "q"), ("assistant", " ")), "messages[1].content: empty assistant message"),
        (
            _chat(("user", "q"), ("assistant", 1.5)),
            "messages[1].content: expected a string or an array of text parts, got a number",
        ),
        (
            _chat(("user", [{"type": "image_url", "image_url": {}}]), ("assistant", "a")),
            'messages[0].content[0].type: unsupported content part "image_url" (only "text" parts are supported)',
        ),
        (
            _chat(("user", [{"type": "text"}]), ("assistant", "a")),
            'messages[0].content[0]: missing key "text"',
        ),
        (
            _chat(("user", "q"), ("assistant", "a"), ("assistant", "b")),
            "messages[2]: two assistant messages in a row (messages[1] and messages[2])",
        ),
        (_chat(("system", "s"), ("user", "q")), "messages: no assistant message (nothing to train on)"),
        (
            _chat(("user", "q"), ("system", "s"), ("assistant", "a")),
            "messages[1]: system message must come first",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0.5},
                ]
            },
            "messages[1].weight: must be 0 or 1, got 0.5",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": True},
                ]
            },
            "messages[1].weight: must be 0 or 1, got true",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0},
                ]
            },
            "messages: every assistant message has weight 0 (nothing to train on)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "tool_calls": [{}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages[0].tool_calls: only assistant messages can have tool_calls",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "", "tool_calls": "x"},
                ]
            },
            "messages[1].tool_calls: expected an array, got a string",
        ),
        (
            {**_chat(("user", "q"), ("assistant", "a")), "tools": {"a": 1}},
            "tools: expected an array, got an object",
        ),
        (
            {**_chat(("user", "q"), ("assistant", "a")), "tools": "[oops"},
            "tools: invalid JSON string: Expecting value",
        ),
    ],
)
def test_messages_bad_rows(row: dict[str, Any], reason: str) -> None:
    assert _reason(row, "messages") == reason


def test_field_too_long_names_the_field_and_the_limit() -> None:
    row = _chat(("user", "q"), ("assistant", "x" * 101))
    assert _reason(row, "messages", max_chars=100) == (
        "messages[1].content: field too long (101 characters; limit 100)"
    )
    assert to_sample(_chat(("user", "q"), ("assistant", "x" * 100)), "messages", REF, max_chars=100)


def test_default_limit_is_ten_million_characters() -> None:
    assert _reason({"text": "y" * 10_000_001}, "text").startswith("text: field too long (10,000,001")
    assert isinstance(to_sample({"text": "y" * 10_000_000}, "text", REF), TextSample)


# --- text and misc ------------------------------------------------------------------------------


def test_text_row() -> None:
    assert to_sample({"text": "hello", "meta": 1}, "text", REF) == TextSample("hello", REF)
    assert _reason({"text": ""}, "text") == "text: empty"
    assert _reason({"text": 1}, "text") == "text: expected a string, got a number"


def test_unknown_format_is_a_programming_error_not_a_row_error() -> None:
    with pytest.raises(ValueError, match="unknown data format 'chatml'") as info:
        to_sample({"text": "x"}, "chatml", REF)
    assert not isinstance(info.value, RowError)


def test_optional_nulls_read_like_absent_keys() -> None:
    """Parquet fills missing struct fields with null; such rows must read like their JSON twin."""
    row = {
        "tools": None,
        "messages": [
            {"role": "user", "content": "q", "weight": None, "tool_calls": None, "name": None},
            {"role": "assistant", "content": "a", "weight": None, "tool_calls": None, "name": None},
        ],
    }
    assert to_sample(row, "messages", REF) == to_sample(
        _chat(("user", "q"), ("assistant", "a")), "messages", REF
    )


@pytest.mark.parametrize(
    "row",
    [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": False,
        },
        {"prompt": "q", "completion": "a", "label": True},
    ],
)
def test_kto_rows_are_refused_by_the_other_methods(row: dict[str, Any], tmp_path) -> None:
    """An undesirable completion must never be trained on as an answer by sft."""
    import json

    from tunesmith.data.errors import DataError
    from tunesmith.data.validate import read_samples

    assert detect_format(row) == "kto"
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="KTO rows .* train with method kto"):
        read_samples(str(path), "auto", "raise", "data.train[0]")
    with pytest.raises(DataError, match="kto rows train with method kto"):
        read_samples(str(path), "kto", "raise", "data.train[0]")


def test_a_label_that_is_not_a_boolean_keeps_the_row_a_conversation() -> None:
    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "label": "pos",
    }
    assert detect_format(row) == "messages"
