"""Exact resume: an interrupted and resumed run has the same per-step losses as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import load_config
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.loop import Trainer, train

ROWS = [(f"Question number {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]


def _config(model_dir, data, out, adapter=None, **train_overrides):
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
        base_config(
            model_dir, data, out, adapter=adapter or {"type": "lora", "r": 4, "dropout": 0.1}, train=settings
        )
    )


FULL = {"type": "full"}


@pytest.mark.parametrize(
    ("adapter", "stop_at"),
    # 5 micro-batches per epoch, 2 per step: steps 1-3 are epoch 1 (2 + 2 + 1), so step 2 stops
    # mid-epoch and step 3 exactly at the epoch boundary; step 4 is mid-epoch in epoch 2.
    [(None, 2), (None, 3), (None, 4), (FULL, 2), (FULL, 3)],
    ids=["lora-mid-epoch", "lora-epoch-boundary", "lora-epoch-2", "full-mid-epoch", "full-epoch-boundary"],
)
def test_interrupt_then_resume_is_bit_identical(adapter, stop_at, tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir = tiny_model_dirs["llama"]
    straight = train(_config(model_dir, data, tmp_path / "a", adapter), show_progress=False)
    assert straight.steps == 9  # 3 epochs x (2 + 2 + 1 micro-batches): an epoch ends where its data ends

    first = train(
        _config(model_dir, data, tmp_path / "b", adapter), show_progress=False, stop_after_step=stop_at
    )
    assert first.interrupted and first.steps == stop_at
    assert [p.name for p in committed_checkpoints(tmp_path / "b" / "checkpoints")][
        -1
    ] == f"step-{stop_at:08d}"
    second = train(_config(model_dir, data, tmp_path / "b", adapter, resume="auto"), show_progress=False)

    resumed = first.losses + second.losses
    assert resumed == straight.losses  # fp32 on CPU: exactly the same floats, not merely close
    straight_norms = [r["grad_norm"] for r in _rows(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    resumed_norms = [r["grad_norm"] for r in _rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert resumed_norms == straight_norms
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_epochs_end_where_the_data_ends(tiny_model_dirs, tmp_path):
    """Each micro-batch of a 2-epoch run comes from its own epoch: no step borrows from a third epoch."""
    from tunesmith.training.batching import BatchStream

    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = _config(tiny_model_dirs["llama"], data, tmp_path / "a", epochs=2, grad_accum=3)
    seen: list[int] = []
    original = BatchStream.micro_batch

    def record(self, index):
        if self.shuffle:
            seen.append(index)
        return original(self, index)

    import unittest.mock

    with unittest.mock.patch.object(BatchStream, "micro_batch", record):
        result = train(cfg, show_progress=False)
    # 5 micro-batches per epoch, 3 per step: steps take 3 + 2 in each epoch, 10 micro-batches in all.
    assert result.steps == 4
    assert seen == list(range(10))
    epochs = [r["epoch"] for r in _rows(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert epochs == [0.6, 1.0, 1.6, 2.0]


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
    assert resumed.losses == straight.losses[4:]
    logged = [r for r in _rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == list(
        range(1, 10)
    )  # rows after the checkpoint were replaced, not doubled


def _rows(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_refuses_to_mix_runs_in_one_directory(tiny_model_dirs, chat_file, tmp_path):
    from tunesmith.training.run_dir import RunDirError

    cfg = load_config(base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "run"))
    train(cfg, show_progress=False)
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(cfg, show_progress=False)
