"""The tokens that end a reply: eos from the model and tokenizer, plus the chat template's end of turn.

Many chat models end a turn with a token that is not their eos (`<|eot_id|>`, `<end_of_turn>`,
`<|im_end|>` when eos is `<|endoftext|>`); generating past it runs into a made-up next turn. The
template itself says which token that is: render one assistant message and read what follows it.
"""

from __future__ import annotations

from typing import Any

from tunesmith.infer.generate import stop_token_ids

_MARK = "XYZZY-reply-end"


def reply_stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    return frozenset(stop_token_ids(model, tokenizer)) | end_of_turn_ids(tokenizer)


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """The special token right after an assistant message in the chat template (none without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return frozenset()
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False
        )
    except Exception:  # a template that insists on other roles or a system turn: eos alone then
        return frozenset()
    if _MARK not in text:
        return frozenset()
    after = text.split(_MARK, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, added in tokenizer.added_tokens_decoder.items() if added.special
    }
    return frozenset(ids[:1]) & frozenset(special)
