"""The behaviour check's second reader of a .gguf: llama.cpp itself, through llama-cpp-python.

transformers' GGUF loader dequantizes the file into ordinary torch weights, so it cannot see what
only llama.cpp does: its own tokenizer, its own reading of the hyperparameters and its quantized
kernels (which also round the activations). When llama-cpp-python is importable the check also:

- renders each conversation with the template stored in the file (llama-cpp-python's own chat
  handling renders differently from transformers, so it is not used) and tokenizes the text with
  llama.cpp's tokenizer: the ids must be the trained tokenizer's;
- asks llama.cpp for the end-of-turn token it found in the file;
- computes next-token logits at every position with llama.cpp and judges them like transformers'
  reading: against the trained model by the type's `CRITERIA`, and against the trained weights
  rounded as the file stores them by mean KL (`LLAMA_CPP_FIDELITY_KL`: llama.cpp's kernels round
  activations too, so the numbers are close, not equal).

Absent, the result carries a note saying so and how to install it; it is not a failure.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

NOT_INSTALLED = (
    "llama.cpp was not installed: the file was read with transformers only "
    "(pip install llama-cpp-python adds a reading by llama.cpp itself)"
)

LLAMA_CPP_FIDELITY_KL = 0.03
"""Mean KL per token between llama.cpp's logits and the trained model with its weights rounded as the
file stores them. llama.cpp's CPU kernels also round the activations (to 8 bits for block-type matrix
products): measured 1e-5 on tiny models and 4.8e-3 on SmolLM2-135M q8_0. A wrong layout or
hyperparameter costs far more (its logits are those of another model)."""


def criteria_for(criteria: Any) -> Any:
    """The type's bounds for llama.cpp's reading: its rounded activations make exact-logit tolerances
    meaningless, so every type is judged by KL (the type's bound plus `LLAMA_CPP_FIDELITY_KL`) and
    top-1 agreement where the trained model is confident."""
    from tunesmith.export.verify import Criteria

    return Criteria(
        max_kl=(criteria.max_kl or 0.0) + LLAMA_CPP_FIDELITY_KL,
        min_top1=criteria.min_top1 if criteria.min_top1 is not None else 0.95,
    )


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def render_texts(tokenizer: Any, template: str, conversations: list[list[dict[str, str]]], renders: Any):
    """Each render's text from the file's template, rendered by tunesmith (not llama-cpp-python)."""
    texts = []
    for render in renders:
        if render.conversation < 0:
            texts.append(None)  # plain text, not a conversation: fed as the trained tokenizer's ids
            continue
        texts.append(
            tokenizer.apply_chat_template(
                conversations[render.conversation],
                chat_template=template,
                add_generation_prompt=render.generation_prompt,
                tokenize=False,
            )
        )
    return texts


def read(path: Path, texts: list[str | None], ids: list[list[int]]) -> dict[str, Any]:
    """llama.cpp's token ids for `texts` (None where a text is None), its logits at every position of
    the trained tokenizer's `ids` (so that they compare even where the tokenizers differ), its EOT and
    EOS ids."""
    import llama_cpp

    longest = max(len(i) for i in ids)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(64, longest + 16),
        n_batch=max(64, longest + 16),
        logits_all=True,
        verbose=False,
    )
    try:
        tokens = [
            None if text is None else llm.tokenize(text.encode(), add_bos=False, special=True)
            for text in texts
        ]
        logits = []
        for render_ids in ids:
            llm.reset()
            llm.eval(render_ids)
            logits.append(torch.from_numpy(np.array(llm.scores[: len(render_ids)], dtype=np.float32)))
        eot = int(llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(llm.model)))
        eos = int(llm.token_eos())
    finally:
        llm.close()
    return {"tokens": tokens, "logits": logits, "eot": None if eot < 0 else eot, "eos": eos}
