"""A non-finite loss stops the run with the step and rows named, and no checkpoint is written for it."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.loop import TrainingDiverged, train
from tunesmith.training.methods.base import LossOutput
from tunesmith.training.methods.sft import SFT


def test_nan_loss_stops_with_a_clear_message(tiny_model_dirs, chat_file, tmp_path, monkeypatch):
    original = SFT.compute_loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        out = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            return LossOutput(out.loss_sum * torch.tensor(float("nan")), out.count)
        return out

    monkeypatch.setattr(SFT, "compute_loss", poisoned)
    cfg = load_config(
        base_config(
            tiny_model_dirs["llama"],
            chat_file,
            tmp_path / "run",
            train={"epochs": 2, "batch_size": 2, "save_every": 1},
        )
    )
    with pytest.raises(TrainingDiverged) as caught:
        train(cfg, show_progress=False)
    message = str(caught.value)
    assert "step 3" in message and "chat.jsonl:" in message
    saved = [p.name for p in committed_checkpoints(tmp_path / "run" / "checkpoints")]
    assert saved[-1] == "step-00000002"
    for path in committed_checkpoints(tmp_path / "run" / "checkpoints"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "trainable.safetensors").values())
