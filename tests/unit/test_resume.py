"""Exact resume: an interrupted and resumed run has the same per-step losses as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import load_config
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.loop import Trainer, train

ROWS = [(f"Question number {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]


def _config(model_dir, data, out, **train_overrides):
    settings = {
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 5e-3,
        "warmup_ratio": 0.2,
        "scheduler": "cosine",
        "seed": 3,
        "max_grad_norm": 1.0,
        **train_overrides,
    }
    return load_config(
        base_config(model_dir, data, out, adapter={"type": "lora", "r": 4, "dropout": 0.1}, train=settings)
    )


@pytest.mark.parametrize(
    "stop_at", [3, 4]
)  # 5 micro-batches per epoch, 2 per step: both stops fall mid-epoch
def test_interrupt_then_resume_matches_straight_run(stop_at, tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir = tiny_model_dirs["llama"]
    straight = train(_config(model_dir, data, tmp_path / "a"), show_progress=False)
    assert straight.steps == 8  # 3 epochs x 5 micro-batches / 2 per step, rounded up

    first = train(_config(model_dir, data, tmp_path / "b"), show_progress=False, stop_after_step=stop_at)
    assert first.interrupted and first.steps == stop_at
    assert [p.name for p in committed_checkpoints(tmp_path / "b" / "checkpoints")][
        -1
    ] == f"step-{stop_at:08d}"
    second = train(_config(model_dir, data, tmp_path / "b", resume="auto"), show_progress=False)

    resumed = first.losses + second.losses
    assert len(resumed) == len(straight.losses)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight.losses), rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_crash_mid_run_resumes_from_last_complete_checkpoint(tiny_model_dirs, tmp_path, monkeypatch):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir = tiny_model_dirs["qwen2"]
    straight = train(_config(model_dir, data, tmp_path / "a", save_every=2), show_progress=False)

    original = Trainer._train_step

    def crash_on_step_6(self):
        if self.state.step == 5:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", crash_on_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(model_dir, data, tmp_path / "b", save_every=2), show_progress=False)
    monkeypatch.setattr(Trainer, "_train_step", original)
    # A half-written checkpoint (no state.json) must be ignored on resume.
    (tmp_path / "b" / "checkpoints" / "step-00000006").mkdir()
    resumed = train(
        _config(model_dir, data, tmp_path / "b", save_every=2, resume="auto"), show_progress=False
    )
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[4:]), rtol=0, atol=1e-6
    )
    logged = [r for r in _rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == list(
        range(1, 9)
    )  # rows after the checkpoint were replaced, not doubled


def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_refuses_to_mix_runs_in_one_directory(tiny_model_dirs, chat_file, tmp_path):
    from tunesmith.training.run_dir import RunDirError

    cfg = load_config(base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "run"))
    train(cfg, show_progress=False)
    with pytest.raises(RunDirError, match="train.resume=auto"):
        train(cfg, show_progress=False)
