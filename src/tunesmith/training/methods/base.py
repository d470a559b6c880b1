"""The seam between the loop and a training method.

A method owns its data, its batches and its loss; the loop owns what every method shares
(accumulation, scaling across processes, clipping, optimizer and schedule, checkpoints and exact
resume, metrics, evaluation, Ctrl-C). The contract that keeps accumulation exact for any method:
each micro-batch says how many loss units it holds (`MicroBatch.units`: trained tokens for SFT,
pairs for preference methods, sequences for reward models), `compute_loss` returns the loss
*summed* over those units, and the loop divides by the step's global unit count before the
backward. Metrics are returned as sums over the same units and averaged the same way.

Two extensions keep other normalisations exact too. A loss term with a unit of its own (DPO's NLL
on chosen tokens, under a loss per pair) comes back in `LossOutput.terms`, keyed by that unit;
the method counts the unit in each micro-batch before the forward (`term_units`, optional), and
the loop divides the term by the step's global count of it. A metric that is a mean over something
else than the step's units (KTO's class means over desirable or undesirable rows) comes with its
own count in `LossOutput.metric_counts`; the loop sums metric and count over the step's
micro-batches and processes and divides the one by the other. `finish_metrics` (optional) derives
metrics from those means (a difference of two class means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from tunesmith.config.schema import RunConfig
    from tunesmith.data.build import BuiltData
    from tunesmith.data.streaming import StreamingRows
    from tunesmith.training.batching import MicroBatch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """The loss summed over this micro-batch's units; the loop divides by the step's unit count."""
    count: torch.Tensor
    """How many units `loss_sum` covers (what evaluation averages over)."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Sums over the same units, e.g. {"rewards/accuracies": correct pairs}; logged as unit means."""
    metric_counts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Own denominators of some metrics: a metric named here is logged as its sum over the step's
    micro-batches and processes divided by this count's sum over the same (omitted where that is 0)."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further loss terms by unit name, each summed over that unit; the loop divides each by the
    step's global count of the unit, which the method's `term_units` gives before the forward."""


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


def term_units(method: Method, mb: MicroBatch) -> dict[str, int]:
    """How many units of each of its `LossOutput.terms` a micro-batch holds: the method's
    `term_units(mb)` where it has one (every micro-batch naming the same terms), else none."""
    count = getattr(method, "term_units", None)
    return dict(count(mb)) if count is not None else {}


def finish_metrics(method: Method, means: dict[str, float]) -> dict[str, float]:
    """The step's metric means with those the method derives from them (its `finish_metrics`)."""
    finish = getattr(method, "finish_metrics", None)
    return finish(means) if finish is not None else means
