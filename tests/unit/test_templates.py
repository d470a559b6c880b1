"""Built-in chat templates render byte-identical text to the templates they stand in for.

Every rendering goes through ``tokenizer.apply_chat_template`` on a small offline tokenizer, which is
exactly the path training uses (transformers' sandboxed Jinja environment, its ``raise_exception``,
the tokenizer's BOS/EOS passed as template variables). References are the official templates in
``tests/fixtures/reference_templates`` and, for Vicuna, FastChat's prompt builder ported below.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tunesmith.data import templates
from tunesmith.data.errors import DataError
from tunesmith.data.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    list_templates,
    resolve_template,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference_templates"

REQUIRED = {
    "alpaca",
    "chatml",
    "deepseek",
    "gemma",
    "gemma3",
    "llama2",
    "llama3",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3_nothink",
    "vicuna",
    "zephyr",
}

# The model family's real BOS/EOS (None: the family has none), so templates see what they would in use.
SPECIAL_TOKENS: dict[str, tuple[str | None, str]] = {
    "alpaca": ("<s>", "</s>"),
    "chatml": ("<s>", "<|im_end|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma": ("<bos>", "<eos>"),
    "gemma3": ("<bos>", "<eos>"),
    "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "qwen2": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "qwen3_nothink": (None, "<|im_end|>"),
    "vicuna": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
}

SYSTEM = "You are a terse assistant.\nAnswer in one line."


def _msg(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


_EXCHANGES = [
    _msg("user", "What is 2 + 2?"),
    _msg("assistant", "4"),
    _msg("user", "And times 3?"),
    _msg("assistant", "12, since (2 + 2) * 3 = 12."),
    _msg("user", "Thanks!\nOne more: a haiku?"),
    _msg("assistant", "Autumn wind rises\nleaves spell out the sum of four\nthree times, twelve again"),
]

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single": [_msg("user", "Hello!")],
    "single_system": [_msg("system", SYSTEM), _msg("user", "Hello!")],
    "single_answered": [_msg("user", "Hello!"), _msg("assistant", "Hi there.")],
    "multi": list(_EXCHANGES),
    "multi_system": [_msg("system", SYSTEM), *_EXCHANGES],
    "multi_open": _EXCHANGES[:5],
    "multi_open_system": [_msg("system", SYSTEM), *_EXCHANGES[:5]],
    "whitespace_unicode": [
        _msg("system", "  Système : réponds en français.  \n"),
        _msg("user", "  Ünïcödé ✓ 你好 🚀\n\nsecond line  "),
        _msg("assistant", "\n  Ça va 👍\n\ttabbed\n  "),
        _msg("user", "{{ not jinja }} {% raw %} <b>html</b> \"double\" 'single' \\n"),
    ],
    "whitespace_no_system": [
        _msg("user", "\n  padded question  \n"),
        _msg("assistant", "  padded answer\n\n"),
        _msg("user", "tab\tand 🚀"),
    ],
    "system_mid_conversation": [
        _msg("system", SYSTEM),
        _msg("user", "Hi"),
        _msg("assistant", "Hello."),
        _msg("system", "Now answer in French."),
        _msg("user", "Bye"),
    ],
    "assistant_first": [_msg("assistant", "I start."), _msg("user", "Fine.")],
    # Reasoning as Qwen3 sees it in plain conversations; other templates treat it as text.
    "think_in_content": [
        _msg("user", "Solve x + 1 = 3."),
        _msg("assistant", "<think>\nSubtract 1.\nx = 2.\n</think>\n\nx = 2"),
        _msg("user", "And x + 2 = 3?"),
        _msg("assistant", "<think>x = 1</think>x = 1"),
    ],
    "reasoning_field": [
        _msg("system", SYSTEM),
        _msg("user", "Why is the sky blue?"),
        _msg("assistant", "Rayleigh scattering.", reasoning_content="Short wavelengths scatter more."),
        _msg("user", "And sunsets?"),
        _msg(
            "assistant",
            "Longer path, blue scattered away.",
            reasoning_content="\n  Same effect, longer path.  \n",
        ),
    ],
    "think_whitespace": [
        _msg("user", "Q1"),
        _msg("assistant", " <think> \n  r1  \n </think> \n\n  A1  "),
        _msg("user", "Q2"),
        _msg("assistant", "<think>\n \n  r2 \n\n</think>\n \n  A2 "),
    ],
    "empty_reasoning_history": [
        _msg("user", "Hi"),
        _msg("assistant", "Hello."),
        _msg("user", "<tool_response>\n42\n</tool_response>"),
        _msg("assistant", "<think>\nThe tool said 42.\n</think>\n\nIt is 42."),
    ],
}

RAISES = "<raises a template error>"


@functools.cache
def _tokenizer(bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; only its special tokens matter to the templates."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials: dict[str, str] = {"eos_token": eos, "unk_token": "[UNK]"}
    if bos is not None:
        specials["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _tokenizer_for(name: str) -> PreTrainedTokenizerFast:
    return _tokenizer(*SPECIAL_TOKENS[name])


def _render(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], generation: bool, **kwargs: Any
) -> str:
    """The template's text for the conversation, or RAISES when the template rejects it."""
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation,
            **kwargs,
        )
    except TemplateError:
        return RAISES


def _fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _fastchat_vicuna(messages: list[dict[str, Any]], generation: bool, bos_token: str) -> str:
    """FastChat's prompt for its "vicuna_v1.1" conversation, with the BOS its tokenizer would add.

    Source: lm-sys/FastChat fastchat/conversation.py, ``register_conv_template(Conversation(
    name="vicuna_v1.1", system_message=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.ADD_COLON_TWO, sep=" ", sep2="</s>"))`` and the ADD_COLON_TWO branch
    of ``Conversation.get_prompt``, copied below. FastChat cannot express a conversation that does not
    alternate user/assistant after the optional system message, so those are RAISES.
    """
    system_message = VICUNA_SYSTEM
    if messages and messages[0]["role"] == "system":
        system_message, messages = messages[0]["content"], messages[1:]
    roles = ("USER", "ASSISTANT")
    conv: list[tuple[str, str | None]] = []
    for i, message in enumerate(messages):
        if message["role"] != ("user", "assistant")[i % 2]:
            return RAISES
        conv.append((roles[i % 2], message["content"]))
    if generation:
        conv.append((roles[1], None))

    # --- FastChat, SeparatorStyle.ADD_COLON_TWO ---
    system_prompt = system_message  # system_template "{system_message}"
    seps = [" ", "</s>"]
    ret = system_prompt + seps[0]
    for i, (role, message) in enumerate(conv):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return bos_token + ret


def _reference(name: str, messages: list[dict[str, Any]], generation: bool, kwargs: dict[str, Any]) -> str:
    """What the official template (or FastChat, for vicuna) renders for this case."""
    return render_reference(name, _tokenizer_for(name), messages, generation, **kwargs)


def render_reference(
    name: str, tokenizer: Any, messages: list[dict[str, Any]], generation: bool, **kwargs: Any
) -> str:
    """The reference rendering of built-in `name` with `tokenizer`'s special tokens (or RAISES)."""
    if name == "vicuna":
        return _fastchat_vicuna(messages, generation, tokenizer.bos_token)
    if name == "alpaca":
        # chujiezheng/chat_templates' README loads its files with exactly this transform.
        template = _fixture("alpaca").replace("    ", "").replace("\n", "")
        return _render(tokenizer, template, messages, generation, **kwargs)
    if name == "qwen3_nothink":
        return _render(
            tokenizer, _fixture("qwen3"), messages, generation, **{"enable_thinking": False, **kwargs}
        )
    return _render(tokenizer, _fixture(name), messages, generation, **kwargs)


THINKING_KWARGS: list[dict[str, Any]] = [{}, {"enable_thinking": True}, {"enable_thinking": False}]

CASES = [
    pytest.param(name, conv, generation, kwargs, id=f"{name}-{conv}-gen{int(generation)}-{kwargs}")
    for name in sorted(SPECIAL_TOKENS)
    for conv in CONVERSATIONS
    for generation in (False, True)
    for kwargs in (THINKING_KWARGS if name.startswith("qwen3") else [{}])
]


@pytest.mark.parametrize(("name", "conv", "generation", "kwargs"), CASES)
def test_builtin_matches_reference_byte_for_byte(
    name: str, conv: str, generation: bool, kwargs: dict[str, Any]
) -> None:
    messages = CONVERSATIONS[conv]
    expected = _reference(name, messages, generation, kwargs)
    got = _render(_tokenizer_for(name), BUILTIN_TEMPLATES[name], messages, generation, **kwargs)
    assert got == expected


def test_plain_conversations_render_everywhere_they_are_supported() -> None:
    """Guard against a reference and a built-in that both reject everything (the comparison above would pass)."""
    for name in SPECIAL_TOKENS:
        for conv in ("single", "multi", "multi_open"):
            assert _render(_tokenizer_for(name), BUILTIN_TEMPLATES[name], CONVERSATIONS[conv], True) != RAISES
        if name != "gemma":  # Gemma 2 has no system role, like the original
            text = _render(
                _tokenizer_for(name), BUILTIN_TEMPLATES[name], CONVERSATIONS["multi_system"], False
            )
            assert SYSTEM in text, name


def test_every_builtin_has_a_reference_and_special_tokens() -> None:
    assert set(list_templates()) >= REQUIRED
    assert set(list_templates()) == set(SPECIAL_TOKENS)
    for name in list_templates():
        if name not in ("vicuna", "qwen3_nothink"):
            assert (FIXTURES / f"{name}.jinja").is_file(), name


def test_builtins_without_a_fixture_have_a_reference_of_their_own() -> None:
    """qwen3_nothink and vicuna are compared with a derived reference; it must not be another built-in's."""
    single, answered = CONVERSATIONS["single"], CONVERSATIONS["single_answered"]
    nothink = _reference("qwen3_nothink", single, True, {})
    assert nothink == _reference("qwen3", single, True, {"enable_thinking": False})
    assert nothink != _reference("qwen3", single, True, {})
    assert nothink.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    vicuna = _reference("vicuna", answered, False, {})
    assert vicuna == f"<s>{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi there.</s>"
    assert _reference("vicuna", single, True, {}).endswith("USER: Hello! ASSISTANT:")


def test_reference_fixtures_name_their_source() -> None:
    for path in sorted(FIXTURES.glob("*.jinja")):
        assert path.read_text(encoding="utf-8").startswith("{#- source: "), path.name


@pytest.mark.parametrize("name", sorted(SPECIAL_TOKENS))
def test_apply_chat_template_tokenizes_builtin(name: str) -> None:
    """The built-ins go through the tokenizing path too, and their special tokens come out as single ids."""
    tokenizer = _tokenizer_for(name)
    messages = CONVERSATIONS["multi_system" if name != "gemma" else "multi"]
    text = _render(tokenizer, BUILTIN_TEMPLATES[name], messages, False)
    ids = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES[name], tokenize=True)[
        "input_ids"
    ]
    assert ids and all(isinstance(i, int) for i in ids)
    assert ids.count(tokenizer.eos_token_id) == text.count(tokenizer.eos_token)
    if tokenizer.bos_token is not None:
        assert ids.count(tokenizer.bos_token_id) == text.count(tokenizer.bos_token)


def test_qwen3_thinking_switch() -> None:
    tokenizer = _tokenizer_for("qwen3")
    single = CONVERSATIONS["single"]
    thinking = _render(tokenizer, BUILTIN_TEMPLATES["qwen3"], single, True)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert _render(tokenizer, BUILTIN_TEMPLATES["qwen3"], single, True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert _render(tokenizer, BUILTIN_TEMPLATES["qwen3_nothink"], single, True).endswith(
        "<think>\n\n</think>\n\n"
    )
    assert (
        _render(tokenizer, BUILTIN_TEMPLATES["qwen3_nothink"], single, True, enable_thinking=True) == thinking
    )
    # History keeps no reasoning; the last turn keeps it.
    text = _render(tokenizer, BUILTIN_TEMPLATES["qwen3"], CONVERSATIONS["think_in_content"], False)
    assert "Subtract 1." not in text
    assert text.endswith("<|im_start|>assistant\n<think>\nx = 1\n</think>\n\nx = 1<|im_end|>\n")


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "deepseek"])
def test_tool_use_is_refused_not_misrendered(name: str) -> None:
    tokenizer = _tokenizer_for(name)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    with_call = [_msg("user", "Add"), {"role": "assistant", "content": "", "tool_calls": [call]}]
    with_result = [_msg("user", "Add"), _msg("tool", "2")]
    template = BUILTIN_TEMPLATES[name]
    assert _render(tokenizer, template, with_call, False) == RAISES
    assert _render(tokenizer, template, with_result, False) == RAISES


# --- resolve_template -------------------------------------------------------------------------------


class _FakeTokenizer:
    def __init__(self, chat_template: Any = None, name_or_path: str = "some/model") -> None:
        self.chat_template = chat_template
        self.name_or_path = name_or_path


@pytest.mark.parametrize("spec", [None, "auto", "model", "AUTO"])
def test_resolve_defaults_to_tokenizer_template(spec: str | None) -> None:
    assert resolve_template(_FakeTokenizer("{{ messages }}"), spec) == "{{ messages }}"


def test_resolve_reads_default_from_named_templates() -> None:
    tokenizer = _FakeTokenizer({"default": "DEFAULT", "tool_use": "TOOLS"})
    assert resolve_template(tokenizer, "auto") == "DEFAULT"


@pytest.mark.parametrize("template", [None, "", "   "])
def test_resolve_auto_without_tokenizer_template_names_the_fix(template: str | None) -> None:
    with pytest.raises(ChatTemplateError) as info:
        resolve_template(_FakeTokenizer(template), None)
    message = str(info.value)
    assert "some/model" in message
    assert "has no chat template" in message
    assert "set data.template to one of:" in message
    assert "or a path to a .jinja file" in message
    for name in list_templates():
        assert name in message
    assert isinstance(info.value, DataError)


def test_resolve_builtin_by_name() -> None:
    tokenizer = _FakeTokenizer("{{ own }}")
    for name in list_templates():
        assert resolve_template(tokenizer, name) == BUILTIN_TEMPLATES[name]


@pytest.mark.parametrize("suffix", [".jinja", ".j2", ".JINJA"])
def test_resolve_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mine{suffix}"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert resolve_template(_FakeTokenizer(), str(path)) == path.read_text(encoding="utf-8")


def test_resolve_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ChatTemplateError, match="does not exist") as info:
        resolve_template(_FakeTokenizer("{{ own }}"), str(missing))
    assert str(missing) in str(info.value)


def test_resolve_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.j2"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="is empty"):
        resolve_template(_FakeTokenizer(), str(path))


def test_resolve_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ChatTemplateError) as info:
        resolve_template(_FakeTokenizer("{{ own }}"), "chatlm")
    message = str(info.value)
    assert "unknown chat template 'chatlm'" in message
    assert "did you mean 'chatml'" in message
    assert "set data.template to one of:" in message
    for name in list_templates():
        assert name in message


def test_builtins_load_lazily() -> None:
    fresh = templates._BuiltinTemplates()
    assert fresh._names is None and not fresh._texts
    assert "chatml" in fresh
    assert not fresh._texts
    assert fresh["chatml"] == BUILTIN_TEMPLATES["chatml"]
    assert set(fresh._texts) == {"chatml"}
    with pytest.raises(KeyError):
        fresh["nope"]
    assert list_templates() == sorted(list_templates())
