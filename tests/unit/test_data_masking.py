"""Masking options: the labelled tokens decode to exactly the expected replies + end-of-turn token."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.batch_tokenize import TokenizeSettings, tokenize_all
from tunesmith.data.conversation import Conversation, Message, RowRef
from tunesmith.data.errors import DataError
from tunesmith.data.templates import BUILTIN_TEMPLATES
from tunesmith.data.tokenize import IGNORE_INDEX, strip_reasoning, tokenize_conversation

EOT = "<|im_end|>"

# ChatML with tools in the Qwen2.5 layout: schemas in the system turn, calls as <tool_call> JSON,
# results as <tool_response> in a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for call in m.tool_calls or [] %}"
    "{{- '<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _conv(*turns: tuple[str, str] | Message, tools=None) -> Conversation:
    messages = tuple(t if isinstance(t, Message) else Message(*t) for t in turns)
    return Conversation(messages, RowRef("mem.jsonl", 7), tools)


def _trained_texts(tokenizer, sample) -> list[str]:
    runs, current = [], []
    for label in [*sample.labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return runs


def _tool_conversation() -> Conversation:
    return _conv(
        ("system", "You can look up the weather."),
        ("user", "What is the weather in Paris?"),
        Message("assistant", "", tool_calls=[CALL]),
        ("tool", '{"temp_c": 21}'),
        ("assistant", "It is 21 degrees in Paris."),
        tools=[WEATHER_TOOL],
    )


MULTI_TURN = (
    ("system", "Be brief."),
    ("user", "Hi there!"),
    ("assistant", "Hello. How can I help?"),
    ("user", "Name two rivers."),
    ("assistant", "The Nile and the Amazon."),
)


def test_mask_history_trains_only_the_last_reply(tokenizer):
    conv = _conv(*MULTI_TURN)
    full = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096)
    last = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096, mask_history=True)
    assert _trained_texts(tokenizer, full) == [
        "Hello. How can I help?" + EOT,
        "The Nile and the Amazon." + EOT,
    ]
    assert _trained_texts(tokenizer, last) == ["The Nile and the Amazon." + EOT]
    assert last.input_ids == full.input_ids


def test_mask_history_respects_a_zero_weight_on_the_last_reply(tokenizer):
    conv = _conv(*MULTI_TURN[:-1], Message("assistant", "The Nile and the Amazon.", weight=0))
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096, mask_history=True)
    assert _trained_texts(tokenizer, sample) == ["Hello. How can I help?" + EOT]


def test_per_message_weight_one_trains_a_user_turn(tokenizer):
    conv = _conv(
        ("system", "Be brief."),
        Message("user", "Teach me this question.", weight=1),
        Message("assistant", "Answer.", weight=0),
    )
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096)
    assert _trained_texts(tokenizer, sample) == ["<|im_start|>user\nTeach me this question." + EOT + "\n"]


def test_a_trained_first_message_excludes_the_templates_default_system_prompt(tokenizer):
    conv = _conv(Message("user", "Teach me this question.", weight=1), Message("assistant", "A.", weight=0))
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096)
    assert "SmolLM" in tokenizer.decode(sample.input_ids)
    assert _trained_texts(tokenizer, sample) == ["Teach me this question." + EOT]


REASONING_REPLY = "<think>\nThe user wants a greeting.\n</think>\n\nHello!"


@pytest.mark.parametrize(
    ("reasoning", "expected"),
    [("keep", REASONING_REPLY + EOT), ("strip", "Hello!" + EOT)],
)
def test_reasoning_blocks_are_kept_or_stripped(tokenizer, reasoning, expected):
    conv = _conv(("user", "Greet me."), ("assistant", REASONING_REPLY))
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 4096, reasoning=reasoning)
    assert _trained_texts(tokenizer, sample) == [expected]
    assert ("<think>" in tokenizer.decode(sample.input_ids)) == (reasoning == "keep")


def test_strip_reasoning_handles_several_blocks_and_an_unopened_close():
    assert strip_reasoning("<think>a</think>One <think>b</think>two") == "One two"
    assert strip_reasoning("thinking without an opening tag\n</think>\n\nAnswer") == "Answer"
    assert strip_reasoning("No reasoning.") == "No reasoning."


def test_tool_calls_and_results_are_rendered_and_masked_as_prompt(tokenizer):
    sample = tokenize_conversation(tokenizer, TOOLS_TEMPLATE, _tool_conversation(), 4096)
    text = tokenizer.decode(sample.input_ids)
    assert '"name": "get_weather"' in text and "<tools>" in text  # tool schemas rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert _trained_texts(tokenizer, sample) == ["It is 21 degrees in Paris." + EOT]


def test_tool_calls_are_masked_with_the_tokenizers_own_template(tokenizer):
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, _tool_conversation(), 4096)
    assert _trained_texts(tokenizer, sample) == ["It is 21 degrees in Paris." + EOT]


def test_mask_history_with_tools_trains_only_the_final_answer(tokenizer):
    conv = _conv(
        ("user", "Weather in Paris, then in Rome?"),
        Message("assistant", "Let me check Paris.", tool_calls=[CALL]),
        ("tool", '{"temp_c": 21}'),
        ("assistant", "Paris: 21 degrees."),
        ("user", "And Rome?"),
        ("assistant", "Rome: I cannot check that."),
        tools=[WEATHER_TOOL],
    )
    every = tokenize_conversation(tokenizer, TOOLS_TEMPLATE, conv, 4096)
    last = tokenize_conversation(tokenizer, TOOLS_TEMPLATE, conv, 4096, mask_history=True)
    assert _trained_texts(tokenizer, every) == [
        "Paris: 21 degrees." + EOT,
        "Rome: I cannot check that." + EOT,
    ]
    assert _trained_texts(tokenizer, last) == ["Rome: I cannot check that." + EOT]


def test_qwen3_multi_turn_with_thinking_finds_every_reply(tokenizer):
    """Qwen3 drops the reasoning of earlier turns, so prefixes are unstable; replies are still found."""
    conv = _conv(
        ("system", "Be brief."),
        ("user", "What is 2 + 2?"),
        ("assistant", "<think>\nAdd them.\n</think>\n\n4"),
        ("user", "And times 3?"),
        ("assistant", "<think>4 * 3</think>12"),
    )
    template = BUILTIN_TEMPLATES["qwen3"]
    sample = tokenize_conversation(tokenizer, template, conv, 4096)
    rendered = tokenizer.apply_chat_template(
        [m.to_template_dict() for m in conv.messages], chat_template=template, tokenize=False
    )
    assert sample.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert "Add them." not in tokenizer.decode(sample.input_ids)  # the template dropped old reasoning
    assert _trained_texts(tokenizer, sample) == ["4" + EOT, "<think>\n4 * 3\n</think>\n\n12" + EOT]

    last = tokenize_conversation(tokenizer, template, conv, 4096, mask_history=True)
    assert _trained_texts(tokenizer, last) == ["<think>\n4 * 3\n</think>\n\n12" + EOT]
    stripped = tokenize_conversation(tokenizer, template, conv, 4096, reasoning="strip")
    # Qwen3 itself writes an empty think block into the last turn: that is what the model will emit.
    assert _trained_texts(tokenizer, stripped) == ["4" + EOT, "<think>\n\n</think>\n\n12" + EOT]


def test_qwen3_repeated_reply_text_is_located_in_its_own_turn(tokenizer):
    conv = _conv(
        ("user", "Say OK."),
        ("assistant", "<think>x</think>OK"),
        ("user", "OK"),
        ("assistant", "<think>y</think>OK"),
    )
    sample = tokenize_conversation(tokenizer, BUILTIN_TEMPLATES["qwen3"], conv, 4096)
    assert _trained_texts(tokenizer, sample) == ["OK" + EOT, "<think>\ny\n</think>\n\nOK" + EOT]
    user_ok = tokenizer.decode(sample.input_ids).index("user\nOK")
    assert user_ok > 0


# A template that rewrites earlier replies: neither prefixes nor the reply text can be found.
SHOUTING_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- set text = m.content | upper if (m.role == 'assistant' and not loop.last) else m.content %}"
    "{{- '<|im_start|>' + m.role + '\\n' + text + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_reply_that_cannot_be_located_is_an_error_naming_the_row(tokenizer):
    conv = _conv(*MULTI_TURN)
    with pytest.raises(DataError, match=r"mem.jsonl:7: cannot locate message 2"):
        tokenize_conversation(tokenizer, SHOUTING_TEMPLATE, conv, 4096)


def test_template_failures_are_reported_per_row_not_raised(tokenizer):
    good = _conv(("user", "Hi"), ("assistant", "Hello."))
    with_tools = _tool_conversation()
    result = tokenize_all(
        [good, with_tools], tokenizer, BUILTIN_TEMPLATES["qwen2"], TokenizeSettings(seq_len=512)
    )
    assert len(result.block) == 1
    [failure] = result.failed
    assert str(failure).startswith("mem.jsonl:7: chat template:") and "tools" in failure.reason


def test_tool_call_arguments_are_passed_to_the_template_as_objects(tokenizer):
    sample = tokenize_conversation(tokenizer, TOOLS_TEMPLATE, _tool_conversation(), 4096)
    text = tokenizer.decode(sample.input_ids)
    call = text.split("<tool_call>\n")[1].split("\n</tool_call>")[0]
    assert json.loads(call)["arguments"] == {"city": "Paris"}
