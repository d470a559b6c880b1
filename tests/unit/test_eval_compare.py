"""Paired bootstrap: equal to a direct numpy computation, and it tells a real change from noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunesmith.eval.compare import MismatchedTasks, compare_results, paired_bootstrap
from tunesmith.eval.results import TaskResult


def _mc(values: list[float]) -> TaskResult:
    return TaskResult("mc:x.jsonl", len(values), {"acc": float(np.mean(values))}, {"acc": values})


def _direct(a: np.ndarray, b: np.ndarray, w_a: np.ndarray, w_b: np.ndarray, resamples: int, seed: int):
    """The textbook loop: one resample at a time, the same item draw for both runs."""
    rng = np.random.default_rng(seed)
    n = len(a)
    draws = rng.integers(0, n, size=(resamples, n))  # drawn in one go: the same stream as blocks of rows
    diffs = []
    for idx in draws:
        mean_a = np.sum(a[idx] * w_a[idx]) / np.sum(w_a[idx])
        mean_b = np.sum(b[idx] * w_b[idx]) / np.sum(w_b[idx])
        diffs.append(mean_b - mean_a)
    return np.percentile(diffs, [2.5, 97.5])


def test_unweighted_interval_equals_the_direct_computation():
    rng = np.random.default_rng(1)
    a = (rng.random(60) < 0.5).astype(float)
    b = (rng.random(60) < 0.6).astype(float)
    (diff,) = paired_bootstrap(_mc(list(a)), _mc(list(b)), resamples=1000, seed=7)
    low, high = _direct(a, b, np.ones(60), np.ones(60), 1000, 7)
    assert diff.diff == pytest.approx(b.mean() - a.mean())
    assert (diff.low, diff.high) == pytest.approx((low, high))


def test_token_weighted_nll_and_ppl():
    rng = np.random.default_rng(2)
    n = 40
    tokens = rng.integers(1, 50, n).astype(float)
    nll_a, nll_b = rng.random(n) * 3, rng.random(n) * 3

    def result(nll):
        mean = float(np.sum(nll * tokens) / tokens.sum())
        return TaskResult(
            "perplexity:p.jsonl",
            n,
            {"nll": mean, "ppl": math.exp(mean)},
            {"nll": list(nll), "tokens": list(tokens)},
        )

    diffs = {d.metric: d for d in paired_bootstrap(result(nll_a), result(nll_b), resamples=1500, seed=3)}
    low, high = _direct(nll_a, nll_b, tokens, tokens, 1500, 3)
    assert (diffs["nll"].low, diffs["nll"].high) == pytest.approx((low, high))
    # ppl: exp of each resample's weighted nll, for A and B alike
    rng2 = np.random.default_rng(3)
    idx = rng2.integers(0, n, size=(1500, n))
    wa = np.exp((nll_a * tokens)[idx].sum(1) / tokens[idx].sum(1))
    wb = np.exp((nll_b * tokens)[idx].sum(1) / tokens[idx].sum(1))
    assert (diffs["ppl"].low, diffs["ppl"].high) == pytest.approx(tuple(np.percentile(wb - wa, [2.5, 97.5])))
    assert "tokens" not in diffs


def test_a_real_gain_excludes_zero_and_noise_covers_it():
    rng = np.random.default_rng(4)
    a = (rng.random(200) < 0.4).astype(float)
    better = a.copy()
    better[np.flatnonzero(a == 0)[:40]] = 1.0  # 40 of 200 items fixed, none broken
    (gain,) = paired_bootstrap(_mc(list(a)), _mc(list(better)), resamples=2000)
    assert gain.low > 0 and gain.significant
    swapped = a.copy()  # as many items fixed as broken: no change on average
    ones, zeros = np.flatnonzero(a == 1)[:20], np.flatnonzero(a == 0)[:20]
    swapped[ones], swapped[zeros] = 0.0, 1.0
    (noise,) = paired_bootstrap(_mc(list(a)), _mc(list(swapped)), resamples=2000)
    assert noise.diff == 0 and noise.low < 0 < noise.high and not noise.significant


def test_metrics_without_items_get_no_interval_and_mismatches_refuse():
    a = TaskResult("mc:x", 2, {"acc": 0.5, "acc/bio": 0.5}, {"acc": [1.0, 0.0]})
    b = TaskResult("mc:x", 2, {"acc": 1.0, "acc/bio": 1.0}, {"acc": [1.0, 1.0]})
    diffs = {d.metric: d for d in paired_bootstrap(a, b)}
    assert diffs["acc/bio"].diff == 0.5 and diffs["acc/bio"].low is None
    assert compare_results([a], [b])[0]["differences"][0]["metric"] == "acc"
    with pytest.raises(MismatchedTasks):
        paired_bootstrap(a, TaskResult("mc:x", 3, {"acc": 1.0}, {"acc": [1.0] * 3}))
