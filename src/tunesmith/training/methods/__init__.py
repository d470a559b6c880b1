"""Training methods by name; each owns its data, batches and loss (see base.py)."""

from __future__ import annotations

from tunesmith.training.methods.base import Method

METHODS = {
    "sft": "tunesmith.training.methods.sft:SFT",
    "pretrain": "tunesmith.training.methods.pretrain:Pretrain",
    "dpo": "tunesmith.training.methods.dpo:DPO",
    "simpo": "tunesmith.training.methods.simpo:SimPO",
    "orpo": "tunesmith.training.methods.orpo:ORPO",
    "kto": "tunesmith.training.methods.kto:KTO",
    "reward": "tunesmith.training.methods.reward:RewardModel",
    "grpo": "tunesmith.training.methods.grpo:GRPO",
}
"""Each method's class, imported only when it is used."""


def get_method(name: str) -> Method:
    import importlib

    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r} (available: {', '.join(METHODS)})")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
