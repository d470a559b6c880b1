"""Labels cover exactly the assistant turns (content + end-of-turn) of what apply_chat_template renders."""

from __future__ import annotations

from tunesmith.data.conversation import Conversation, Message, RowRef
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
