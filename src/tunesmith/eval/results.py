"""What every evaluation task returns, and the `results.json` it is written as."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
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


def results_payload(
    results: list[TaskResult],
    *,
    model: str | None = None,
    other: tuple[str, list[TaskResult]] | None = None,
    differences: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What `results.json` holds: `{"results": [...]}`; with a comparison also `"compare"`, holding
    the other model's `results` and, per task, the `differences` (other - this, with the CI)."""
    out: dict[str, Any] = {}
    if model is not None:
        out["model"] = model
    out["results"] = [r.to_json() for r in results]
    if other is not None:
        out["compare"] = {
            "model": other[0],
            "results": [r.to_json() for r in other[1]],
            "differences": differences or [],
        }
    return out


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as JSON, through a temporary file so a reader never sees half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(target)
    return target
