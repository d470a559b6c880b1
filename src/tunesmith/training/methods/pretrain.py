"""Continued pretraining: raw text, every token trained, long documents split into windows."""

from __future__ import annotations

from tunesmith.training.methods.sft import SFT


class Pretrain(SFT):
    """Same next-token loss as SFT; only the data differs (text rows, no chat template)."""

    name = "pretrain"
