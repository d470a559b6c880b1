"""What every training method provides: its data and a batch -> loss function."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunesmith.config.schema import DataConfig
from tunesmith.data.build import BuiltData


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over trained tokens; the loop divides by the step's token count
    count: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method(Protocol):
    name: str

    def build_data(self, cfg: DataConfig, tokenizer: Any) -> BuiltData: ...

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...
