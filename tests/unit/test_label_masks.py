"""Labels cover exactly the assistant turns (content + end-of-turn) of what apply_chat_template renders."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from test_templates import CONVERSATIONS, RAISES, SPECIAL_TOKENS, render_reference

from tunesmith.data.conversation import Conversation, Message, RowRef
from tunesmith.data.errors import DataError
from tunesmith.data.templates import BUILTIN_TEMPLATES, list_templates
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_conversation

TURNS = [
    ("system", "You are terse."),
    ("user", "Hi there!"),
    ("assistant", "Hello. How can I help?"),
    ("user", "Name two\nrivers, please."),
    ("assistant", "The Nile and the Amazon — both long."),
]


def _conversation(turns=TURNS, weights=None) -> Conversation:
    weights = weights or [None] * len(turns)
    messages = tuple(
        Message(role, content, weight) for (role, content), weight in zip(turns, weights, strict=True)
    )
    return Conversation(messages, RowRef("mem", 1))


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_input_ids_equal_the_tokenizers_own_rendering(tokenizer):
    conv = _conversation()
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, seq_len=4096)
    reference = tokenizer.apply_chat_template(
        [m.to_template_dict() for m in conv.messages], tokenize=True, return_dict=True
    )["input_ids"]
    assert sample.input_ids == list(reference)


def test_labels_are_the_assistant_spans_and_nothing_else(tokenizer):
    conv = _conversation()
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, seq_len=4096)
    runs = _labelled_runs(sample.labels)
    replies = [content for role, content in TURNS if role == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [reply + tokenizer.eos_token for reply in replies]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(run[-1] == eot for run in runs)  # the model learns to stop
    for position, label in enumerate(sample.labels):
        assert label in (IGNORE_INDEX, sample.input_ids[position])


def test_default_system_prompt_injected_by_the_template_is_not_trained(tokenizer):
    conv = _conversation(TURNS[1:])
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, seq_len=4096)
    text = tokenizer.decode(sample.input_ids)
    assert "SmolLM" in text  # SmolLM2's template adds its own system prompt
    assert "SmolLM" not in "".join(tokenizer.decode(r) for r in _labelled_runs(sample.labels))


def test_train_on_prompt_trains_every_token(tokenizer):
    sample = tokenize_conversation(
        tokenizer, tokenizer.chat_template, _conversation(), 4096, train_on_prompt=True
    )
    assert sample.labels == sample.input_ids


def test_per_message_weight_zero_masks_that_turn(tokenizer):
    conv = _conversation(weights=[None, None, 0, None, 1])
    sample = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, seq_len=4096)
    assert [tokenizer.decode(r) for r in _labelled_runs(sample.labels)] == [TURNS[4][1] + tokenizer.eos_token]


def test_truncation_is_reported_and_keeps_the_start(tokenizer):
    full = tokenize_conversation(tokenizer, tokenizer.chat_template, _conversation(), seq_len=4096)
    cut = tokenize_conversation(tokenizer, tokenizer.chat_template, _conversation(), seq_len=30)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:30] and cut.labels == full.labels[:30]


# --- every built-in, against spans found in its reference rendering ------------------------------

# The family's own special tokens, added to the SmolLM2 tokenizer as single tokens like the real
# tokenizers have them, so that token boundaries fall where they would in use.
FAMILY_SPECIALS: dict[str, list[str]] = {
    "deepseek": ["<｜User｜>", "<｜Assistant｜>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}

# How each family opens and closes an assistant turn: what the model must produce ends with END,
# and HEADER precedes the reply where prefix renderings do not show it (a template that renders
# history differently from the last turn).
END_OF_TURN: dict[str, str] = {
    "alpaca": "</s>",
    "chatml": "<|im_end|>",
    "deepseek": "<｜end▁of▁sentence｜>",
    "gemma": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "llama2": "</s>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "phi3": "<|end|>",
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "qwen3_nothink": "<|im_end|>",
    "vicuna": "</s>",
    "zephyr": "</s>",
}
HEADER: dict[str, str] = {
    "alpaca": "### Response:\n",
    "chatml": "<|im_start|>assistant\n",
    "deepseek": "<｜Assistant｜>",
    "gemma": "<start_of_turn>model\n",
    "gemma3": "<start_of_turn>model\n",
    "llama2": " [/INST]",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": " [/INST]",
    "phi3": "<|assistant|>\n",
    "qwen2": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "qwen3_nothink": "<|im_start|>assistant\n",
    "vicuna": "ASSISTANT:",
    "zephyr": "<|assistant|>\n",
}

MASK_CONVERSATIONS = (
    "single_answered",
    "multi",
    "multi_system",
    "system_mid_conversation",
    "think_in_content",
)

REFUSED = {("qwen3_nothink", "think_in_content")}
"""Cases tunesmith refuses on purpose: the non-thinking prompt closes the reasoning block itself."""


@functools.cache
def _family_tokenizer(name: str) -> Any:
    """The SmolLM2 tokenizer with the family's BOS/EOS and turn markers as special tokens."""
    from transformers import AutoTokenizer

    from tunesmith.models.default_model import default_tokenizer_dir

    bos, eos = SPECIAL_TOKENS[name]
    return AutoTokenizer.from_pretrained(
        default_tokenizer_dir(),
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=FAMILY_SPECIALS.get(name, []),
    )


def _reference_spans(
    name: str, tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """Each reply's [start, end) in the reference rendering: after the generation prompt, through END.

    The start is where the reference's rendering of the conversation before the reply, plus the
    generation prompt, ends; where that is not a prefix of the full text, the reply follows the
    family's HEADER. The end is the family's end-of-turn marker after it.
    """
    full = render_reference(name, tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_reference(name, tokenizer, messages[:i], True)
        if full.startswith(before) and len(before) >= cursor:
            start = len(before)
        else:
            start = full.index(HEADER[name], cursor) + len(HEADER[name])
        end = full.index(END_OF_TURN[name], start) + len(END_OF_TURN[name])
        answer = message["content"].split("</think>")[-1].strip()
        assert answer in full[start:end], (name, full[start:end])
        spans.append((start, end))
        cursor = end
    return full, spans


def _reference_labels(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Labels from character spans; every token must lie wholly inside or outside each span."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        assert not any(start < edge < end for span in spans for edge in span), (text[start:end], spans)
        labels.append(token if any(a <= start < b for a, b in spans) else IGNORE_INDEX)
    return labels


def _mask_cases() -> list[Any]:
    cases = []
    for name in sorted(SPECIAL_TOKENS):
        for conv in MASK_CONVERSATIONS:
            if name == "gemma" and CONVERSATIONS[conv][0]["role"] == "system":
                continue  # Gemma 2 has no system role
            if (name, conv) not in REFUSED:
                cases.append(pytest.param(name, conv, id=f"{name}-{conv}"))
    return cases


@pytest.mark.parametrize(("name", "conv"), _mask_cases())
def test_builtin_label_mask_equals_the_reference_spans(name: str, conv: str) -> None:
    messages = CONVERSATIONS[conv]
    tokenizer = _family_tokenizer(name)
    if render_reference(name, tokenizer, messages, False) == RAISES:
        pytest.skip(f"{name} does not render {conv}, like its reference")
    text, spans = _reference_spans(name, tokenizer, messages)
    conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in messages), RowRef("mem", 1))
    sample = tokenize_conversation(tokenizer, BUILTIN_TEMPLATES[name], conversation, seq_len=4096)
    expected = _reference_labels(tokenizer, text, spans)
    assert tokenizer.decode(sample.input_ids) == text
    assert sample.labels == expected, [tokenizer.decode([t]) for t in sample.labels if t != IGNORE_INDEX]
    assert len(_labelled_runs(expected)) == sum(m["role"] == "assistant" for m in messages)


def test_every_builtin_is_covered_by_the_label_mask_comparison() -> None:
    assert set(END_OF_TURN) == set(HEADER) == set(list_templates())
    covered = {case.values[0] for case in _mask_cases()}
    assert covered == set(list_templates())


def test_reasoning_under_a_non_thinking_template_is_refused_with_the_fix() -> None:
    """qwen3_nothink prompts with an empty <think></think>: a reply's own reasoning cannot be trained."""
    messages = CONVERSATIONS["think_in_content"]
    tokenizer = _family_tokenizer("qwen3_nothink")
    conversation = Conversation(tuple(Message(m["role"], m["content"]) for m in messages), RowRef("mem", 1))
    with pytest.raises(DataError, match="data.reasoning: strip"):
        tokenize_conversation(tokenizer, BUILTIN_TEMPLATES["qwen3_nothink"], conversation, seq_len=4096)
    stripped = tokenize_conversation(
        tokenizer, BUILTIN_TEMPLATES["qwen3_nothink"], conversation, seq_len=4096, reasoning="strip"
    )
    assert "<think>\n\n</think>" in tokenizer.decode(stripped.input_ids)
    assert stripped.num_trained > 0
