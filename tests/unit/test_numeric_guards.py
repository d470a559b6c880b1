"""Runs whose numbers go bad stop before anything bad is saved: non-finite updates and gradients,
collapsed models, and fp16 overflows (skipped, counted, and fatal only when they never end)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.loop import FP16_MAX_CONSECUTIVE_OVERFLOWS, Trainer, TrainingDiverged, train


def _cfg(tiny_model_dirs, chat_file, out, adapter=None, **train_settings):
    settings = {"epochs": 3, "batch_size": 2, **train_settings}
    return load_config(
        base_config(
            tiny_model_dirs["llama"],
            chat_file,
            out,
            adapter=adapter or {"type": "lora", "r": 4},
            train=settings,
        )
    )


def _all_checkpoints_finite(run_dir):
    for path in committed_checkpoints(run_dir / "checkpoints"):
        for name, tensor in load_file(path / "trainable.safetensors").items():
            assert torch.isfinite(tensor).all(), f"{path.name}: {name}"


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "loss" in r]


def test_non_finite_update_is_never_checkpointed(tiny_model_dirs, chat_file, tmp_path):
    """lr=1e300 turns step 1's update into Inf; before, that checkpoint was committed."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(_cfg(tiny_model_dirs, chat_file, out, lr=1e300, save_every=1), show_progress=False)
    message = str(caught.value)
    assert "step 1" in message and "NaN/Inf" in message and "no checkpoint was written" in message
    assert committed_checkpoints(out / "checkpoints") == []
    assert not (out / "adapter").exists()


def test_non_finite_gradient_stops_before_the_update(tiny_model_dirs, chat_file, tmp_path, monkeypatch):
    """A real Inf gradient (not a mocked loss): the grad-norm branch stops the run at that step."""
    out = tmp_path / "run"
    original = Trainer._clip

    def poison_then_clip(self, max_norm):
        if self.state.step == 2:  # the third step
            next(p for p in self.wrapped.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
        return original(self, max_norm)

    monkeypatch.setattr(Trainer, "_clip", poison_then_clip)
    with pytest.raises(TrainingDiverged, match="step 3: gradient norm is (inf|nan)") as caught:
        train(_cfg(tiny_model_dirs, chat_file, out, save_every=1), show_progress=False)
    assert "step-00000002" in str(caught.value)  # names the checkpoint to continue from
    assert [p.name for p in committed_checkpoints(out / "checkpoints")][-1] == "step-00000002"
    _all_checkpoints_finite(out)


def test_collapsed_model_stops_instead_of_finishing(tiny_model_dirs, chat_file, tmp_path):
    """Full fine-tuning at lr=1e6: the loss freezes at ln(vocab), the gradient at exactly 0."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="collapsed") as caught:
        train(
            _cfg(tiny_model_dirs, chat_file, out, {"type": "full"}, lr=1e6, save_every=1), show_progress=False
        )
    assert "ln(vocab size" in str(caught.value)
    assert not (out / "model").exists() and not (out / "run.json").exists()
    # What is left to resume from was trained before the collapse: it still has gradients.
    for path in committed_checkpoints(out / "checkpoints"):
        assert int(path.name.split("-")[1]) < len(_rows(out))


def _fp16_cfg(tiny_model_dirs, chat_file, out, **settings):
    return _cfg(tiny_model_dirs, chat_file, out, precision="fp16", **settings)


def test_fp16_overflow_skips_the_step_and_training_goes_on(tiny_model_dirs, chat_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Trainer._backward
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def overflow_at_step_2(self, *args, **kwargs):
        trainable = {n: p.detach().clone() for n, p in self.wrapped.named_parameters() if p.requires_grad}
        seen[self.state.step] = trainable
        loss = original(self, *args, **kwargs)
        if self.state.step == 1:  # as an fp16 overflow does: an Inf in the (scaled) gradients
            next(p for p in self.wrapped.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(Trainer, "_backward", overflow_at_step_2)
    result = train(_fp16_cfg(tiny_model_dirs, chat_file, out, max_grad_norm=1.0), show_progress=False)
    assert not result.interrupted and result.steps == 12
    rows = _rows(out)
    assert rows[1].get("skipped") is True and rows[1]["grad_norm"] is None
    assert [r["overflow_steps"] for r in rows[:3]] == [0, 1, 1]
    assert rows[2]["loss_scale"] == rows[0]["loss_scale"] / 2  # the scaler backed off once
    for name, before in seen[1].items():  # the overflowing step changed no weight
        assert torch.equal(before, seen[2][name]), name
    assert any(not torch.equal(seen[2][n], seen[3][n]) for n in seen[2])  # the next step trains again
    assert rows[2]["lr"] == rows[1]["lr"]  # the schedule did not advance over the skipped update
    assert (out / "run.json").is_file()


def test_fp16_reports_unscaled_gradient_norms(tiny_model_dirs, chat_file, tmp_path):
    """Without clipping the norm used to be of the scaled gradients (x65536)."""
    fp16 = train(_fp16_cfg(tiny_model_dirs, chat_file, tmp_path / "a", max_steps=2), show_progress=False)
    fp32 = train(_cfg(tiny_model_dirs, chat_file, tmp_path / "b", max_steps=2), show_progress=False)
    assert fp16.steps == fp32.steps == 2
    first16, first32 = _rows(tmp_path / "a")[0]["grad_norm"], _rows(tmp_path / "b")[0]["grad_norm"]
    assert first16 == pytest.approx(first32, rel=0.05)


def test_fp16_endless_overflow_stops_with_a_message(tiny_model_dirs, chat_file, tmp_path, monkeypatch):
    original = Trainer._backward

    def always_overflow(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        next(p for p in self.wrapped.parameters() if p.requires_grad).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "_backward", always_overflow)
    cfg = _fp16_cfg(tiny_model_dirs, chat_file, tmp_path / "run", max_steps=40, save_every=1)
    with pytest.raises(TrainingDiverged, match=f"overflowed {FP16_MAX_CONSECUTIVE_OVERFLOWS} steps in a row"):
        train(cfg, show_progress=False)
    _all_checkpoints_finite(tmp_path / "run")
