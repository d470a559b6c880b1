"""Continued pretraining: raw text, every token trained, long documents split into windows.

The windows are made in `tunesmith.data.tokenize.tokenize_text`: each starts with BOS when the
tokenizer adds one (Llama, Gemma; not SmolLM or Qwen), and consecutive windows of one document
share `data.pretrain_overlap` tokens of context, checked against `data.seq_len` before any work.
"""

from __future__ import annotations

from tunesmith.training.methods.sft import SFT


class Pretrain(SFT):
    """Same next-token loss as SFT; only the data differs (text rows, no chat template)."""

    name = "pretrain"
