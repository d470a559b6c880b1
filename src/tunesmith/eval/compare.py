"""Two runs on the same task, item by item: the difference B - A of each metric with a paired
bootstrap confidence interval.

Items are resampled with replacement, the same draw for both runs (that is the pairing: an item
that is hard for A is hard for B too, so the interval is much narrower than two independent ones),
and each resample's statistic is recomputed for A and B. Token-level metrics of perplexity tasks
(`nll`, `token_acc`) are means over tokens, so each item weighs its `per_item["tokens"]`; `ppl` is
exp of the resample's weighted `nll`. The interval is the percentile interval of the resampled
differences. Metrics without per-item values (per-subject breakdowns) get the difference only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tunesmith.data.errors import DataError
from tunesmith.eval.results import TaskResult

WEIGHT_KEY = "tokens"
"""A `per_item` entry holding each item's weight (token count); not a metric itself."""
DERIVED = {"ppl": ("nll", np.exp)}
"""Metrics computed from another metric's resampled mean."""
BLOCK = 256  # resamples drawn at once (bounds memory at BLOCK x n)


class MismatchedTasks(DataError):
    """The two results are not the same items, so they cannot be paired."""


@dataclass(frozen=True)
class Difference:
    metric: str
    a: float
    b: float
    diff: float
    low: float | None
    high: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_bootstrap(
    a: TaskResult,
    b: TaskResult,
    *,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[Difference]:
    """One `Difference` per metric both results have, in A's order."""
    if a.task != b.task or a.n != b.n:
        raise MismatchedTasks(f"cannot pair {a.task} ({a.n} items) with {b.task} ({b.n} items)")
    indices = _resample_indices(a.n, resamples, seed)
    out = []
    for metric, value in a.metrics.items():
        if metric not in b.metrics:
            continue
        low = high = None
        draws_a, draws_b = _draws(a, metric, indices), _draws(b, metric, indices)
        if draws_a is not None and draws_b is not None:
            low, high = percentile_interval(draws_b - draws_a, confidence)
        out.append(Difference(metric, value, b.metrics[metric], b.metrics[metric] - value, low, high))
    return out


def _resample_indices(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """The item draws, in blocks of rows; the same for every metric and both runs."""
    rng = np.random.default_rng(seed)
    blocks, left = [], resamples
    while left > 0:
        rows = min(BLOCK, left)
        blocks.append(rng.integers(0, n, size=(rows, n)))
        left -= rows
    return blocks


def _draws(result: TaskResult, metric: str, indices: list[np.ndarray]) -> np.ndarray | None:
    """The metric recomputed on each resample, or None when the result has no per-item values for it."""
    base, transform = DERIVED.get(metric, (metric, None))
    if metric in result.per_item:
        base, transform = metric, None
    values = result.per_item.get(base)
    if values is None or len(values) != result.n or base == WEIGHT_KEY:
        return None
    x = np.asarray(values, dtype=np.float64)
    weights = result.per_item.get(WEIGHT_KEY)
    w = np.asarray(weights, dtype=np.float64) if weights is not None else np.ones_like(x)
    means = np.concatenate([(x * w)[rows].sum(1) / w[rows].sum(1) for rows in indices])
    return transform(means) if transform is not None else means


def percentile_interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def compare_results(
    a: list[TaskResult], b: list[TaskResult], *, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per task (in A's order, tasks both have): `{"task": ..., "differences": [Difference.to_json()]}`."""
    by_task = {r.task: r for r in b}
    out = []
    for result in a:
        other = by_task.get(result.task)
        if other is None:
            continue
        diffs = paired_bootstrap(result, other, resamples=resamples, seed=seed)
        out.append({"task": result.task, "differences": [d.to_json() for d in diffs]})
    return out
