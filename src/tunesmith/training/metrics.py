"""metrics.jsonl (one JSON object per logged step or eval) and the loss-curve plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to metrics.jsonl, then hands each row to the sinks (the trackers), in order."""

    def __init__(
        self, path: Path, resume_step: int | None, sinks: Iterable[Callable[[dict[str, Any]], None]] = ()
    ) -> None:
        self.path = path
        self.sinks = list(sinks)
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        else:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Rows logged after the checkpoint we resume from are replayed, so drop them."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for sink in self.sinks:  # after the file: a tracker never holds a row metrics.jsonl lacks
            sink(row)


def step_metric_means(sums: dict[str, float], counts: dict[str, float], units: float) -> dict[str, float]:
    """A step's metrics from sums over all its micro-batches and processes.

    A metric with a count of its own (`LossOutput.metric_counts`) is divided by that count's sum,
    and left out where it is 0 (a mean over no rows); every other metric by the step's units.
    """
    means = {}
    for name in sorted(sums):
        if name not in counts:
            means[name] = sums[name] / max(units, 1)
        elif counts[name] > 0:
            means[name] = sums[name] / counts[name]
    return means


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
    return rows


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
