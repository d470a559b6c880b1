"""Supervised fine-tuning: next-token loss on the trained (by default: assistant) tokens."""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config.schema import DataConfig
from tunesmith.data.build import BuiltData, build_data
from tunesmith.training.methods.base import LossOutput


class SFT:
    name = "sft"

    def build_data(self, cfg: DataConfig, tokenizer: Any) -> BuiltData:
        return build_data(cfg, tokenizer, self.name)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        loss_sum, count = model(**batch)
        return LossOutput(loss_sum, count)
