"""What every evaluation task returns, and the `results.json` it is written as."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """One task's outcome.

    `metrics` are the aggregate numbers (`acc`, `nll`, ...); `per_item` holds, per metric that is a
    mean over items, the item values in file order, so that two runs can be compared item by item
    (paired bootstrap); `samples` is filled with `--log-samples` only.
    """

    task: str
    n: int
    metrics: dict[str, float]
    per_item: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "n": self.n, "metrics": self.metrics}
        if self.samples is not None:
            out["samples"] = self.samples
        return out
