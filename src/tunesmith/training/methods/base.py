"""The seam between the loop and a training method.

A method owns its data, its batches and its loss; the loop owns what every method shares
(accumulation, scaling across processes, clipping, optimizer and schedule, checkpoints and exact
resume, metrics, evaluation, Ctrl-C). The contract that keeps accumulation exact for any method:
each micro-batch says how many loss units it holds (`MicroBatch.units`: trained tokens for SFT,
pairs for preference methods, sequences for reward models), `compute_loss` returns the loss
*summed* over those units, and the loop divides by the step's global unit count before the
backward. Metrics are returned as sums over the same units and averaged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from tunesmith.config.schema import RunConfig
    from tunesmith.data.build import BuiltData
    from tunesmith.data.streaming import StreamingRows


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """The loss summed over this micro-batch's units; the loop divides by the step's unit count."""
    count: torch.Tensor
    """How many units `loss_sum` covers (what evaluation averages over)."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Sums over the same units, e.g. {"rewards/accuracies": correct pairs}; logged as unit means."""


@dataclass
class PreparedData:
    """What a method built from `data:` before training: samples in memory, or a stream of rows."""

    data: BuiltData
    stream_rows: StreamingRows | None = None
    fingerprint: str = ""
    """A hash of the training data, stored with each checkpoint so a resume refuses other data."""


class BatchSource(Protocol):
    """A resumable sequence of micro-batches: index k alone (plus `state_dict`) fixes batch k."""

    per_epoch: int | None
    fill: float | None

    def micro_batch(self, index: int) -> Any: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Method(Protocol):
    name: str
    unit: str
    """What the loss is normalised by: "token", "pair" or "sequence" (shown in the run's first lines)."""
    zero_gradient_is_normal: bool
    """Whether a step may have an exactly zero gradient in healthy training (GRPO: every group's
    rewards equal, so every advantage is 0); otherwise the loop takes it for a collapsed model."""

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData: ...

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        """The training and (optional) evaluation micro-batch sources."""
        ...

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        """The module the loop prepares, checkpoints through and calls in `compute_loss`."""
        ...

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...
