"""Two processes give the numbers of one: same per-step losses, gradient norms, token counts, eval
losses and final adapter as one process accumulating the same micro-batches (fp32, packing, samples
of varied length), and a two-process run resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import load_config
from tunesmith.training.launch import launch_train
from tunesmith.training.loop import train
from tunesmith.training.metrics import read_metrics

pytestmark = pytest.mark.slow

# Answers from 1 to 40 words: packed rows hold different numbers of samples and trained tokens, so a
# loss normalised per process instead of over all processes would show. 17 rows pack into 15 rows of
# 96 tokens: an odd count, so each epoch's last step leaves one rank without a micro-batch of its own.
ROWS = [
    (f"Question {i}: tell me about item {i}.", " ".join(["word"] * (1 + (i * 7) % 40))) for i in range(17)
]
EVAL_ROWS = [(f"Held-out {i}?", " ".join(["other"] * (2 + i * 5))) for i in range(5)]
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def rank_threads_here():
    """The one-process reference runs with the thread count each rank of two gets. Another count
    changes the order of float sums in the matmuls, and Adam turns those last-bit differences of
    near-zero gradients into weight differences above the tolerance: the comparison is of the
    distributed arithmetic, not of two thread counts."""
    from tunesmith.training.launch import threads_per_rank

    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank(2))
    yield
    torch.set_num_threads(before)


def _config(tmp_path: Path, model_dir: Path, name: str, adapter: str = "lora", **train: Any) -> Any:
    data = write_chat_jsonl(tmp_path / "train.jsonl", ROWS)
    held_out = write_chat_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)
    raw = base_config(
        model_dir,
        data,
        tmp_path / name,
        data={
            "train": [{"path": str(data)}],
            "eval": [{"path": str(held_out)}],
            "seq_len": 96,
            "packing": True,
        },
        adapter={"type": adapter},
        train={"epochs": 2, "batch_size": 1, "lr": 1e-2, "max_grad_norm": 1.0, **train},
    )
    return load_config(raw)


def _rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def _assert_same_run(one: Path, two: Path) -> None:
    steps_1, evals_1 = _rows(one)
    steps_2, evals_2 = _rows(two)
    assert [r["step"] for r in steps_1] == [r["step"] for r in steps_2]
    assert len(steps_1) >= 4
    for key in ("tokens", "trained_tokens", "epoch", "lr"):
        assert [r[key] for r in steps_1] == [r[key] for r in steps_2], key
    for key in ("loss", "grad_norm"):
        a = torch.tensor([r[key] for r in steps_1], dtype=torch.float64)
        b = torch.tensor([r[key] for r in steps_2], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE, msg=key)
    assert steps_1[0]["loss"] > steps_1[-1]["loss"]  # it trained
    assert [r["step"] for r in evals_1] == [r["step"] for r in evals_2] and evals_1
    torch.testing.assert_close(
        torch.tensor([r["eval_loss"] for r in evals_1], dtype=torch.float64),
        torch.tensor([r["eval_loss"] for r in evals_2], dtype=torch.float64),
        rtol=0,
        atol=TOLERANCE,
    )
    adapter_1, adapter_2 = _weights(one), _weights(two)
    assert adapter_1.keys() == adapter_2.keys() and adapter_1
    for name in adapter_1:
        torch.testing.assert_close(adapter_1[name], adapter_2[name], rtol=0, atol=TOLERANCE, msg=name)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights the run saved: the LoRA adapter, or the whole model."""
    files = sorted((run_dir / "adapter").glob("*.safetensors")) or sorted(
        (run_dir / "model").glob("*.safetensors")
    )
    return {f"{path.name}:{name}": t for path in files for name, t in load_file(path).items()}


@pytest.mark.parametrize(("accum", "adapter"), [(1, "lora"), (2, "lora"), (1, "full")])
def test_two_processes_equal_one_process_accumulating(accum, adapter, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    lr = {"lr": 1e-3} if adapter == "full" else {}
    one = train(_config(tmp_path, model_dir, "one", adapter, grad_accum=2 * accum, **lr), show_progress=False)
    two = launch_train(
        _config(tmp_path, model_dir, "two", adapter, grad_accum=accum, **lr), 2, show_progress=False
    )
    assert two.steps == one.steps and not two.interrupted
    _assert_same_run(one.run_dir, two.run_dir)
    # Only rank 0 wrote the run directory: one row per step, one checkpoint per save.
    steps_2, _ = _rows(two.run_dir)
    assert len(steps_2) == len({r["step"] for r in steps_2})


def test_two_process_run_resumes_exactly(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    straight = launch_train(_config(tmp_path, model_dir, "straight", grad_accum=1), 2, show_progress=False)
    stopped = launch_train(
        _config(tmp_path, model_dir, "resumed", grad_accum=1), 2, show_progress=False, stop_after_step=3
    )
    assert stopped.interrupted and stopped.steps == 3
    resumed = launch_train(
        _config(tmp_path, model_dir, "resumed", grad_accum=1, resume="auto"), 2, show_progress=False
    )
    assert resumed.steps == straight.steps
    _assert_same_run(straight.run_dir, resumed.run_dir)


def test_a_one_process_run_resumes_on_two_processes_keeping_the_micro_batches_per_step(
    tiny_model_dirs, tmp_path
):
    model_dir = tiny_model_dirs["llama"]
    straight = train(_config(tmp_path, model_dir, "straight", grad_accum=2), show_progress=False)
    stopped = train(
        _config(tmp_path, model_dir, "moved", grad_accum=2), show_progress=False, stop_after_step=3
    )
    assert stopped.interrupted and stopped.steps == 3
    resumed = launch_train(
        _config(tmp_path, model_dir, "moved", grad_accum=1, resume="auto"), 2, show_progress=False
    )
    assert resumed.steps == straight.steps
    _assert_same_run(straight.run_dir, resumed.run_dir)
