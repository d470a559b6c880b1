"""The tokens that end a reply: eos from the model and tokenizer, plus the chat template's end of turn.

Many chat models end a turn with a token that is not their eos (`<|eot_id|>`, `<end_of_turn>`,
`<|im_end|>` when eos is `<|endoftext|>`); generating past it runs into a made-up next turn. The
ids are the ones `tunesmith chat` and the export use (`infer.generate.reply_stop_ids`).
"""

from __future__ import annotations

from typing import Any

from tunesmith.infer.generate import reply_stop_ids as _reply_stop_ids


def reply_stop_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    return frozenset(_reply_stop_ids(model, tokenizer))
