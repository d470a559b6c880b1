"""Each `train.scheduler`: the lr the optimizer gets at every step equals the schedule's formula."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.config.schema import TrainConfig
from tunesmith.training.optim import build_scheduler, make_scheduler

LR = 1e-3


def _curve(total: int, **train) -> list[float]:
    """The lr of each of `total` steps, read as the loop reads it (before the step's scheduler.step)."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=LR)
    scheduler = make_scheduler(optimizer, TrainConfig(lr=LR, **train), total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def _warm(step: int, warmup: int) -> float:
    return (step + 1) / (warmup + 1)


def test_default_cosine_is_the_historic_curve():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=LR)
    historic = build_scheduler(optimizer, "cosine", 0.05, 40)
    rates = []
    for _ in range(40):
        rates.append(historic.get_last_lr()[0])
        optimizer.step()
        historic.step()
    assert _curve(40) == rates


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_decays_to_min_lr_after_warmup(kind, min_lr_ratio):
    total, warmup_ratio = 20, 0.2
    warmup = math.ceil(warmup_ratio * total)  # 4
    rates = _curve(total, scheduler=kind, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    for step, lr in enumerate(rates):
        if step < warmup:
            expected = _warm(step, warmup)
        else:
            p = (step - warmup) / (total - warmup)
            decay = 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p
            expected = min_lr_ratio + (1 - min_lr_ratio) * decay
        assert lr == pytest.approx(LR * expected, rel=1e-12), step
    assert min(rates) >= LR * min_lr_ratio - 1e-15


def test_warmup_steps_replace_the_ratio():
    rates = _curve(10, scheduler="constant", warmup_ratio=0.5, warmup_steps=2)
    assert rates == pytest.approx([LR / 3, 2 * LR / 3] + [LR] * 8, rel=1e-12)


def test_cosine_with_restarts():
    total, cycles = 21, 3
    rates = _curve(
        total, scheduler="cosine_with_restarts", warmup_steps=1, num_cycles=cycles, min_lr_ratio=0.2
    )
    for step in range(1, total):
        p = (step - 1) / (total - 1)
        expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1)))
        assert rates[step] == pytest.approx(LR * expected, rel=1e-12), step
    # each cycle restarts at the full lr: steps 1, 1 + 20/3 ~ 7.67 -> the first steps past each third
    peaks = [s for s in range(2, total) if rates[s] > rates[s - 1]]
    assert peaks == [8, 15]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warmup_stable_decay(shape):
    total = 40
    rates = _curve(
        total, scheduler="wsd", warmup_steps=4, wsd_decay_ratio=0.25, wsd_decay_shape=shape, min_lr_ratio=0.1
    )
    decay_start = total - math.ceil(0.25 * total)  # 30
    assert rates[:4] == pytest.approx([LR * _warm(s, 4) for s in range(4)], rel=1e-12)
    assert rates[4:decay_start] == [LR] * (decay_start - 4)  # stable: the full lr exactly
    for step in range(decay_start, total):
        q = (step - decay_start) / (total - decay_start)
        f = {"linear": 1 - q, "cosine": 0.5 * (1 + math.cos(math.pi * q)), "1-sqrt": 1 - math.sqrt(q)}[shape]
        assert rates[step] == pytest.approx(LR * (0.1 + 0.9 * f), rel=1e-12), step
    assert all(b <= a for a, b in zip(rates[decay_start:], rates[decay_start + 1 :], strict=False))


def test_inverse_sqrt():
    rates = _curve(50, scheduler="inverse_sqrt", warmup_steps=5)
    assert rates[:5] == pytest.approx([LR * _warm(s, 5) for s in range(5)], rel=1e-12)
    for step in range(5, 50):
        assert rates[step] == pytest.approx(LR * math.sqrt(5 / step), rel=1e-12)
    floored = _curve(50, scheduler="inverse_sqrt", warmup_steps=5, min_lr_ratio=0.5)
    assert floored[:20] == rates[:20]  # sqrt(5 / 20) = 0.5: the floor holds from step 20 on
    assert floored[20:] == pytest.approx([LR * 0.5] * 30, rel=1e-12)


def test_inverse_sqrt_without_warmup_starts_at_the_full_lr():
    rates = _curve(10, scheduler="inverse_sqrt", warmup_ratio=0.0)
    assert rates[:2] == [LR, LR] and rates[4] == pytest.approx(LR / 2)


def test_schedule_keys_apply_on_resume_and_the_optimizer_is_refused():
    from tunesmith.config.schema import RunConfig
    from tunesmith.training.errors import ResumeMismatch
    from tunesmith.training.resume_policy import compare_configs

    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    saved = RunConfig.model_validate(base).model_dump(mode="json")
    schedule = {"scheduler": "wsd", "warmup_steps": 3, "min_lr_ratio": 0.1, "wsd_decay_ratio": 0.2}
    schedule |= {"num_cycles": 2, "wsd_decay_shape": "cosine"}
    changes = compare_configs(saved, RunConfig.model_validate({**base, "train": schedule}))
    assert sorted(k for k, _, _ in changes.applied) == sorted(f"train.{k}" for k in schedule)
    for optim in ({"name": "lion"}, {"betas": [0.9, 0.95]}, {"weight_decay": 0.1}):
        with pytest.raises(ResumeMismatch, match="optim"):
            compare_configs(saved, RunConfig.model_validate({**base, "optim": optim}))
