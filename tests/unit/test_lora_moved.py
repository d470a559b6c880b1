"""LoRA training moves both adapter matrices away from where they started.

`lora_B` starts at zero, so "non-zero" proves it moved; `lora_A` starts random, so it is compared with
its initial values, taken from a zero-step run: the model and adapter built exactly as `train` builds
them (same seed, same calls in the same order) and never stepped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from conftest import base_config, zero_step_model
from tunesmith.config.load import load_config
from tunesmith.training.loop import train

TRAIN = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "max_grad_norm": None}


def _lora(model: Any, matrix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if matrix in n}


def _checkpoint_lora_a(run: Path, step: int) -> dict[str, torch.Tensor]:
    weights = load_file(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")
    return {name: value for name, value in weights.items() if "lora_A" in name}


def test_lora_a_and_b_moved_from_their_initial_values(tiny_model_dirs, chat_file, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(base_config(tiny_model_dirs["llama"], chat_file, run, train={**TRAIN, "save_every": 1}))
    initial = zero_step_model(cfg)
    initial_a, initial_b = _lora(initial, "lora_A"), _lora(initial, "lora_B")
    assert initial_a and all(not b.any() for b in initial_b.values())

    trained = train(cfg, show_progress=False)
    assert trained.steps == 2
    # Fidelity of the zero-step model: the first step cannot move lora_A (lora_B = 0 gives it no
    # gradient, and weight decay is 0), so the step-1 checkpoint still holds the initial lora_A.
    after_one = _checkpoint_lora_a(run, 1)
    assert len(after_one) == len(initial_a)
    for name, value in after_one.items():
        [initial_name] = [n for n in initial_a if n.endswith(name) or name.endswith(n)]
        assert torch.equal(value, initial_a[initial_name]), name

    trained_a, trained_b = _lora(trained.model, "lora_A"), _lora(trained.model, "lora_B")
    assert trained_a.keys() == initial_a.keys() and trained_b.keys() == initial_b.keys()
    for name, value in trained_a.items():
        assert not torch.equal(value, initial_a[name]), name
    for name, value in trained_b.items():
        assert value.abs().sum() > 0, name
