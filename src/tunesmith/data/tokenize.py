"""Render samples with the chat template and build label masks (-100 = not trained).

Which messages are trained: explicit per-message ``weight`` first (0 or 1); otherwise assistant
replies, except those that only call tools (a tool call is the prompt for the tool result, and
the result is prompt too). ``train_on_prompt`` trains every message; ``mask_history`` keeps only
the last trained reply (multi-turn rows then teach only the final answer).

Where a trained message sits in the rendered text is found with the same template the model
will see at inference. First by rendering prefixes: the text between "conversation up to
message i with the generation prompt" and "conversation through message i" is what the model
must produce, end-of-turn token included. Templates that render history differently from the
last turn (Qwen3 drops the reasoning of earlier turns) give unstable prefixes; for those
messages the reply is located in the full rendering instead, in order, followed by the
end-of-turn text the template writes after it. Neither is assumed: a reply that cannot be
located is an error naming the row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.data.conversation import Conversation, Message, RowRef, TextSample
from tunesmith.data.errors import DataError

IGNORE_INDEX = -100
Reasoning = Literal["keep", "strip"]

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    source: RowRef
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


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


# --- what is trained ----------------------------------------------------------------------------


def strip_reasoning(content: str) -> str:
    """Remove ``<think>...</think>`` blocks, and any reasoning before an unopened ``</think>``."""
    content = _THINK_BLOCK.sub("", content)
    if _THINK_CLOSE in content:
        content = content.split(_THINK_CLOSE)[-1].lstrip()
    return content


def _is_trained(message: Message, train_on_prompt: bool) -> bool:
    if message.weight is not None:
        return message.weight > 0
    if train_on_prompt:
        return True
    return message.role == "assistant" and not message.tool_calls


def trained_messages(
    conv: Conversation, train_on_prompt: bool = False, mask_history: bool = False
) -> list[int]:
    """Indices of the messages whose tokens are trained, in order."""
    chosen = [i for i, m in enumerate(conv.messages) if _is_trained(m, train_on_prompt)]
    return chosen[-1:] if mask_history else chosen


def template_message(message: Message, reasoning: Reasoning) -> dict[str, Any]:
    """The dict the template sees: reasoning stripped on request, tool arguments as objects.

    OpenAI data stores ``function.arguments`` as a JSON string while chat templates expect a dict
    (they ``tojson`` it); a string would be written twice-encoded.
    """
    out = message.to_template_dict()
    if reasoning == "strip" and message.role == "assistant":
        out["content"] = strip_reasoning(message.content)
    if message.tool_calls:
        out["tool_calls"] = [_decode_arguments(call) for call in message.tool_calls]
    return out


def _decode_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


# --- where it is --------------------------------------------------------------------------------


def trained_char_spans(
    tokenizer: Any,
    template: str,
    conv: Conversation,
    train_on_prompt: bool = False,
    *,
    mask_history: bool = False,
    reasoning: Reasoning = "keep",
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans whose tokens are trained."""
    messages = [template_message(m, reasoning) for m in conv.messages]
    full = render(tokenizer, template, messages, conv.tools, add_generation_prompt=False)
    if train_on_prompt and not mask_history and all(m.weight is None for m in conv.messages):
        return full, [(0, len(full))]
    spans: list[tuple[int, int]] = []
    done = 0  # end of the last trained span
    seen = 0  # end of the last message located so far (a hint for where to search next)
    trained = set(trained_messages(conv, train_on_prompt, mask_history))
    for i, message in enumerate(messages):
        if i not in trained:
            seen = _skip_past(full, message.get("content"), max(seen, done))
            continue
        is_assistant = message["role"] == "assistant"
        span, through = _prefix_span(tokenizer, template, messages, conv.tools, i, full, is_assistant)
        if span is None or span[0] < done:
            span = _located_span(full, message["content"], through, (max(seen, done), done), conv.source, i)
        if span[1] > span[0]:
            spans.append(span)
        done = seen = max(done, span[1])
    return full, spans


def _prefix_span(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    tools: Any,
    i: int,
    full: str,
    is_assistant: bool,
) -> tuple[tuple[int, int] | None, str | None]:
    """The span from prefix renderings, or None where the prefixes are not stable."""
    from jinja2.exceptions import TemplateError

    try:
        if i == 0:  # no prefix to render; what a template writes first (a default system prompt) is not it
            return None, render(tokenizer, template, messages[:1], tools, add_generation_prompt=False)
        before = render(tokenizer, template, messages[:i], tools, add_generation_prompt=is_assistant)
        last = i == len(messages) - 1
        through = full if last else render(tokenizer, template, messages[: i + 1], tools, False)
    except TemplateError:  # some templates refuse a prefix (e.g. one that ends on a tool call)
        return None, None
    if not (full.startswith(through) and through.startswith(before)):
        if is_assistant:
            plain = render(tokenizer, template, messages[:i], tools, add_generation_prompt=False)
            _refuse_reasoning_after_empty_block(before[len(plain) :], messages[i].get("content"), i)
        return None, through
    end = _reply_end(through, len(before), messages[i].get("content")) if is_assistant else len(through)
    return (len(before), max(end, len(before))), through


def _refuse_reasoning_after_empty_block(generation_prompt: str, content: Any, i: int) -> None:
    """A template whose generation prompt closes the reasoning block cannot train a reply with reasoning.

    Qwen3's non-thinking mode (`qwen3_nothink`) prompts with an empty `<think></think>`; a reply that
    brings its own reasoning would be trained as text the model is never prompted to write.
    """
    if _THINK_CLOSE not in generation_prompt or not isinstance(content, str):
        return
    if strip_reasoning(content) != content:
        raise DataError(
            f"message {i} holds reasoning (<think>...</think>), but this chat template's generation "
            f"prompt writes an empty reasoning block (a non-thinking mode such as qwen3_nothink), so "
            f"the reasoning would never be prompted for: set data.reasoning: strip to train the answers "
            f"only, or use a thinking template (data.template: qwen3) to train the reasoning too"
        )


def _reply_end(through: str, start: int, content: Any) -> int:
    """Where the reply that ends `through` ends: its content, then its end-of-turn marker only.

    After the last message some templates also close the conversation (Phi-3 writes EOS after
    "<|end|>\n"); that text is not the turn's, and it is not there when another turn follows.
    """
    if isinstance(content, str):
        for candidate in _content_candidates(content):
            at = through.rfind(candidate)
            if at >= start:
                end = at + len(candidate)
                return end + len(_marker(through[end:]))
    return len(through.rstrip())


def _marker(tail: str) -> str:
    """The end-of-turn text after a reply: any whitespace, then one run of non-space characters."""
    match = re.match(r"\s*\S+", tail)
    return match.group(0) if match else ""


def _located_span(
    full: str, content: str, through: str | None, starts: tuple[int, int], source: RowRef, i: int
) -> tuple[int, int]:
    """Find message i's content in the full rendering, plus its end-of-turn.

    The search starts after the previous message (`starts[0]`), and again after the previous
    trained span (`starts[1]`) in case an earlier message was matched too far. The end-of-turn
    text is what the template writes after the content when the message is the last one
    (`through`); an occurrence not followed by it is not the message (it is a quote).
    """
    for cursor in dict.fromkeys(starts):
        for candidate in _content_candidates(content):
            eot = _end_of_turn(through, candidate)
            start = full.find(candidate, cursor)
            while start >= 0:
                end = start + len(candidate)
                if full.startswith(eot, end):
                    return start, end + len(eot)
                start = full.find(candidate, start + 1)
    raise DataError(
        f"{source}: cannot locate message {i} in the text the chat template renders (the template "
        f"changes it, and does not render conversation prefixes stably); set data.template to a "
        f"built-in template or a .jinja file that renders message content verbatim"
    )


def _content_candidates(content: str) -> list[str]:
    """How a template may have written the content: verbatim, trimmed, or without its reasoning."""
    out: list[str] = []
    after_reasoning = content.split(_THINK_CLOSE)[-1].lstrip("\n")  # how Qwen3 writes earlier replies
    for text in (
        content,
        content.strip(),
        after_reasoning,
        strip_reasoning(content),
        strip_reasoning(content).strip(),
    ):
        if text and text not in out:
            out.append(text)
    return out


def _end_of_turn(through: str | None, content: str) -> str:
    if not through:
        return ""
    at = through.rfind(content)
    return _marker(through[at + len(content) :]) if at >= 0 else ""


def _skip_past(full: str, content: Any, cursor: int) -> int:
    """Move past an untrained message so that a later reply is not matched inside it."""
    if not isinstance(content, str) or not content.strip():
        return cursor
    at = full.find(content.strip(), cursor)
    return at + len(content.strip()) if at >= 0 else cursor


# --- tokens -------------------------------------------------------------------------------------


def tokenize_conversation(
    tokenizer: Any,
    template: str,
    conv: Conversation,
    seq_len: int,
    train_on_prompt: bool = False,
    *,
    mask_history: bool = False,
    reasoning: Reasoning = "keep",
) -> TokenizedSample:
    text, spans = trained_char_spans(
        tokenizer, template, conv, train_on_prompt, mask_history=mask_history, reasoning=reasoning
    )
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


_FOLLOW_TOKENIZER: Any = object()


def tokenize_text(
    tokenizer: Any, sample: TextSample, seq_len: int, overlap: int = 0, bos: int | None = _FOLLOW_TOKENIZER
) -> list[TokenizedSample]:
    """Raw text for continued pretraining: EOS at the end, long texts split into windows.

    Each window starts with BOS when the tokenizer adds one (`add_bos_token`: Llama, Gemma), as
    the model saw every document during pretraining. Consecutive windows share `overlap` tokens;
    in the later window those are context only (not trained), so every token is trained once.
    `bos`: the id `bos_token_id(tokenizer)` gives, when the caller has it already.
    """
    if bos is _FOLLOW_TOKENIZER:
        bos = bos_token_id(tokenizer)
    ids = list(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    prefix = [] if bos is None else [bos]
    size = seq_len - len(prefix)
    check_overlap(overlap, seq_len, bos is not None)
    out = []
    for start, trained_from, end in text_windows(len(ids), size, overlap):
        window = prefix + ids[start:end]
        context = len(prefix) + trained_from - start  # BOS and the overlap are never targets
        labels = [IGNORE_INDEX] * context + ids[trained_from:end]
        if len(window) > 1:
            out.append(TokenizedSample(window, labels, sample.source))
    return out


def text_windows(length: int, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, first trained position, end) of each window over `length` tokens."""
    windows: list[tuple[int, int, int]] = []
    start, trained_from = 0, 0
    while trained_from < length:
        end = min(start + size, length)
        windows.append((start, trained_from, end))
        start, trained_from = end - overlap, end
    return windows


def bos_token_id(tokenizer: Any) -> int | None:
    """The BOS id each document starts with, or None where the tokenizer adds none (SmolLM, Qwen).

    `add_bos_token` decides; a tokenizer that does not expose it (or whose flag was not kept when
    it was saved) still shows what it does when asked for special tokens: a BOS in front.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", False):
        return bos
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def check_overlap(overlap: int, seq_len: int, with_bos: bool) -> None:
    """A window must add at least one new token, or splitting a document would never end."""
    room = seq_len - 1 if with_bos else seq_len
    if overlap < room:
        return
    bos = " minus the BOS token each window starts with" if with_bos else ""
    raise DataError(
        f"data.pretrain_overlap ({overlap}) must be smaller than data.seq_len ({seq_len}){bos}: "
        f"set data.pretrain_overlap below {room}"
    )
