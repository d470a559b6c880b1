"""What a resume may change: lr, length and cadence are applied; model, data and batch shape are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import load_config
from tunesmith.training.errors import ResumeMismatch
from tunesmith.training.loop import train
from tunesmith.training.optim import WarmupSchedule

ROWS = [(f"Question {i}: what is {i} times 3?", f"{i} times 3 is {3 * i}.") for i in range(12)]


def _cfg(model_dir, data, out, **train_settings):
    settings = {
        "epochs": 1,
        "max_steps": 6,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        **train_settings,
    }
    return load_config(base_config(model_dir, data, out, adapter={"type": "lora", "r": 4}, train=settings))


def _logged(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "loss" in r]


def test_resume_applies_new_lr_and_horizon(tiny_model_dirs, tmp_path, capsys):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir, out = tiny_model_dirs["llama"], tmp_path / "run"
    train(_cfg(model_dir, data, out), show_progress=False, stop_after_step=3)

    resumed = _cfg(model_dir, data, out, lr=1e-3, max_steps=10, resume="auto")
    result = train(resumed, show_progress=True)
    assert result.steps == 10
    rows = _logged(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # Steps 4..10 follow a cosine from the new lr over the new horizon of 10 steps.
    schedule = WarmupSchedule("cosine", 0, 10)
    for row in rows[3:]:
        assert row["lr"] == pytest.approx(1e-3 * schedule(row["step"] - 1), rel=1e-12)
    # ... while steps 1..3 kept the old rate over the old horizon of 6.
    old = WarmupSchedule("cosine", 0, 6)
    for row in rows[:3]:
        assert row["lr"] == pytest.approx(1e-2 * old(row["step"] - 1), rel=1e-12)
    said = capsys.readouterr().out
    assert "train.lr 0.01 -> 0.001" in said and "train.max_steps 6 -> 10" in said


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"batch_size": 4}, "train.batch_size"),
        ({"grad_accum": 2}, "train.grad_accum"),
        ({"seed": 7}, "train.seed"),
    ],
)
def test_resume_refuses_changed_batch_shape(override, key, tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir, out = tiny_model_dirs["llama"], tmp_path / "run"
    train(_cfg(model_dir, data, out), show_progress=False, stop_after_step=2)
    with pytest.raises(ResumeMismatch, match=key.replace(".", r"\.")):
        train(_cfg(model_dir, data, out, resume="auto", **override), show_progress=False)


def test_resume_refuses_changed_model_adapter_and_seq_len(tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    train(_cfg(tiny_model_dirs["llama"], data, out), show_progress=False, stop_after_step=2)
    settings = {
        "epochs": 1,
        "max_steps": 6,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        "resume": "auto",
    }
    changed = base_config(
        tiny_model_dirs["llama"], data, out, adapter={"type": "lora", "r": 8}, train=settings
    )
    changed["data"]["seq_len"] = 64
    with pytest.raises(ResumeMismatch) as caught:
        train(load_config(changed), show_progress=False)
    assert "adapter.r: 4 in the checkpoint, 8 now" in str(caught.value)
    assert "data.seq_len: 128 in the checkpoint, 64 now" in str(caught.value)


def test_resume_refuses_changed_data(tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir, out = tiny_model_dirs["llama"], tmp_path / "run"
    train(_cfg(model_dir, data, out), show_progress=False, stop_after_step=2)
    write_chat_jsonl(data, ROWS[:-1] + [("Question 11: what is 11 times 3?", "Thirty-three.")])
    with pytest.raises(ResumeMismatch, match="training data differs"):
        train(_cfg(model_dir, data, out, resume="auto"), show_progress=False)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_resume_without_checkpoint_starts_cleanly_and_says_so(streaming, tiny_model_dirs, tmp_path, capsys):
    """A run that crashed before its first checkpoint leaves metrics but nothing to resume from."""
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir, out = tiny_model_dirs["llama"], tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # what the crashed run left
    cfg = _cfg(model_dir, data, out, resume="auto")
    if streaming:
        cfg = load_config(cfg, {"data.streaming": True, "data.packing": True})
    result = train(cfg, show_progress=True)
    assert result.steps == 6 and not result.interrupted
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in _logged(out)] == list(range(1, 7))  # the stale row is gone, no duplicates
    assert (out / "run.json").is_file()


def _run_config(grad_accum: int) -> Any:
    from tunesmith.config.load import load_config

    return load_config({"data": {"train": [{"path": "x.jsonl"}]}, "train": {"grad_accum": grad_accum}})


def test_a_resume_on_more_processes_may_lower_grad_accum_to_keep_the_step():
    from tunesmith.training.resume_policy import compare_configs

    saved = _run_config(4).model_dump(mode="json")
    changes = compare_configs(saved, _run_config(2), saved_processes=1, processes=2)
    assert changes.applied == [("train.grad_accum x processes", "4 x 1", "2 x 2")]
    assert compare_configs(saved, _run_config(4), saved_processes=1, processes=1).applied == []


@pytest.mark.parametrize(("accum", "processes"), [(4, 2), (2, 1), (1, 3)])
def test_a_resume_that_changes_the_micro_batches_per_step_is_refused(accum, processes):
    from tunesmith.training.resume_policy import compare_configs

    saved = _run_config(4).model_dump(mode="json")
    with pytest.raises(ResumeMismatch, match=r"took 4 micro-batches per step .* would take"):
        compare_configs(saved, _run_config(accum), saved_processes=1, processes=processes)
