"""Every architecture trains with LoRA and full tuning: the loss falls, exactly the trainable weights move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHITECTURES, base_config, zero_step_model
from tunesmith.config.load import load_config
from tunesmith.training.loop import train


def _initial_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _base_name(name: str) -> str:
    """PEFT's name for a base weight -> the plain model's name."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_loss_falls_and_only_trainable_weights_change(arch, adapter, tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs[arch]
    cfg = load_config(
        base_config(
            model_dir,
            chat_file,
            tmp_path / "run",
            adapter={"type": adapter} if adapter == "full" else {"type": "lora", "r": 8, "alpha": 16},
            train={
                "epochs": 6,
                "batch_size": 4,
                "lr": 1e-2 if adapter == "lora" else 3e-3,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
                "seed": 0,
                "max_grad_norm": None,
            },
        )
    )
    initial_lora = {n: p.detach().clone() for n, p in zero_step_model(cfg).named_parameters() if "lora_" in n}
    result = train(cfg, show_progress=False)
    losses = result.losses
    assert len(losses) == 12
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # A random model starts near ln(vocab) = 10.8 nats. Full tuning learns the tiny set fast; LoRA with a
    # frozen random embedding and head moves less, but must still fall clearly.
    assert last < (0.85 * first if adapter == "full" else first - 0.2), losses

    before = _initial_weights(model_dir)
    changed, unchanged = [], []
    for name, param in result.model.named_parameters():
        key = _base_name(name)
        if key in before:
            moved = not torch.equal(param.detach(), before[key])
        else:  # a LoRA weight: compared with the adapter `train` started from
            moved = not torch.equal(param.detach(), initial_lora[name])
        (changed if moved else unchanged).append((name, param.requires_grad))
    assert all(trainable for _, trainable in changed), [n for n, t in changed if not t]
    assert not any(trainable for _, trainable in unchanged), [n for n, t in unchanged if t]
    if adapter == "lora":
        assert any("lora_B" in n for n, _ in changed)
        assert any("lora_A" in n for n, _ in changed)
    else:
        assert not unchanged


def test_freeze_trains_only_the_last_layers(tiny_model_dirs, chat_file, tmp_path):
    model_dir = tiny_model_dirs["qwen2"]
    cfg = load_config(
        base_config(model_dir, chat_file, tmp_path / "run", adapter={"type": "freeze", "trainable_layers": 1})
    )
    result = train(cfg, show_progress=False)
    before = _initial_weights(model_dir)
    for name, param in result.model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == name.startswith("model.layers.1."), name
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
