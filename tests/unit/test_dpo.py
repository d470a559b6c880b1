"""DPO on the one loop: ln 2 at the start, separable pairs learned, exact accumulation and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.loop import train

PAIRS = [
    (f"Question {i}: is the sky blue?", f"Yes, it is blue {i}.", f"No idea, maybe green {i}.")
    for i in range(12)
]


def _pairs_file(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, chosen, rejected in PAIRS:
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def _cfg(model_dir: Path, data: Path, out: Path, adapter: str = "lora", **train_overrides) -> dict:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "full"} if adapter == "full" else {"type": "lora", "r": 8, "alpha": 16},
        train={"batch_size": 4, "lr": 5e-3 if adapter == "lora" else 1e-3, **train_overrides},
    )
    cfg["method"] = "dpo"
    cfg["data"]["eval_split"] = 0.0
    return cfg


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_first_step_loss_is_ln2_with_zero_rewards(adapter, tiny_model_dirs, tmp_path):
    """Policy == reference before the first update: every log-ratio is 0, so the loss is ln 2."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dirs["llama"], _pairs_file(tmp_path / "p.jsonl"), run, adapter, max_steps=2)
    train(load_config(cfg), show_progress=False)
    first = _rows(run)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert _rows(run)[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the update moved the policy


def test_separable_pairs_are_learned(tiny_model_dirs, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dirs["qwen2"], _pairs_file(tmp_path / "p.jsonl"), run, epochs=8, scheduler="constant"
    )
    train(load_config(cfg), show_progress=False)
    rows = _rows(run)
    assert len(rows) == 24
    assert rows[-1]["loss"] < 0.5 * math.log(2), [r["loss"] for r in rows]
    assert min(r["rewards/accuracies"] for r in rows[-3:]) > 0.9
    assert rows[-1]["rewards/margins"] > 0


def test_accumulation_equals_the_bigger_batch(tiny_model_dirs, tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl")
    model_dir = tiny_model_dirs["mistral"]
    big = train(load_config(_cfg(model_dir, data, tmp_path / "a", batch_size=4)), show_progress=False)
    acc = train(
        load_config(_cfg(model_dir, data, tmp_path / "b", batch_size=2, grad_accum=2)), show_progress=False
    )
    assert big.steps == acc.steps == 3
    assert big.losses == pytest.approx(acc.losses, abs=1e-6)


RPO_PAIRS = [
    (f"Question {i}: is the sky blue?", "Yes" + ", it is blue" * (1 + (5 * i) % 7) + ".", f"No, green {i}.")
    for i in range(8)
]
"""Chosen answers of very different lengths: micro-batches hold unequal numbers of chosen tokens."""


def test_rpo_accumulation_equals_the_bigger_batch(tiny_model_dirs, tmp_path, monkeypatch):
    """With rpo_alpha, 2 micro-batches of 2 pairs give the loss and gradients of 1 of 4 (fp32).

    The NLL term is a token mean over the chosen answers of the whole step; a mean per micro-batch
    weighs a token of a short micro-batch above one of a long one.
    """
    from tunesmith.training import loop

    grads: dict[str, list[dict[str, torch.Tensor]]] = {}
    clip = loop.Trainer._clip

    def recording_clip(self, max_norm):
        named = self.wrapped.named_parameters()
        grads[self.run_dir.name].append({n: p.grad.clone() for n, p in named if p.grad is not None})
        return clip(self, max_norm)

    monkeypatch.setattr(loop.Trainer, "_clip", recording_clip)
    data = tmp_path / "p.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for prompt, chosen, rejected in RPO_PAIRS:
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    results = {}
    for name, shape in {"big": dict(batch_size=4), "acc": dict(batch_size=2, grad_accum=2)}.items():
        grads[name] = []
        cfg = _cfg(tiny_model_dirs["llama"], data, tmp_path / name, "full", precision="fp32", **shape)
        cfg["dpo"] = {"rpo_alpha": 0.7}
        results[name] = train(load_config(cfg), show_progress=False)
    big, acc = results["big"], results["acc"]
    assert big.steps == acc.steps == 2
    assert big.losses == pytest.approx(acc.losses, abs=1e-6)
    assert big.losses[0] > math.log(2) + 0.1  # the NLL term is in the loss
    for step_big, step_acc in zip(grads["big"], grads["acc"], strict=True):
        assert step_big.keys() == step_acc.keys() and step_big
        for name, grad in step_big.items():
            torch.testing.assert_close(step_acc[name], grad, rtol=0, atol=1e-6, msg=name)
    for name in ("big", "acc"):  # the NLL metric is the same token mean
        rows = _rows(tmp_path / name)
        assert all("nll_loss" in row for row in rows)
    assert [r["nll_loss"] for r in _rows(tmp_path / "big")] == pytest.approx(
        [r["nll_loss"] for r in _rows(tmp_path / "acc")], abs=1e-6
    )


def test_resume_is_exact(tiny_model_dirs, tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl")
    model_dir = tiny_model_dirs["llama"]
    straight = train(load_config(_cfg(model_dir, data, tmp_path / "a", epochs=2)), show_progress=False)
    first = train(
        load_config(_cfg(model_dir, data, tmp_path / "b", epochs=2)), show_progress=False, stop_after_step=2
    )
    resumed_cfg = _cfg(model_dir, data, tmp_path / "b", epochs=2, resume="auto")
    second = train(load_config(resumed_cfg), show_progress=False)
    assert first.losses + second.losses == straight.losses


def test_example_config_and_pairs_load(tokenizer, monkeypatch):
    """examples/dpo.yaml is valid and every example pair tokenizes (none skipped or dropped)."""
    from tunesmith.data.preference import build_preference_data

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example's paths are repo-relative
    cfg = load_config("examples/dpo.yaml")
    assert cfg.method == "dpo"
    built = build_preference_data(cfg.data, tokenizer, "dpo")
    assert len(built.train) + len(built.eval) == 16
    assert all(pair.chosen_ids and pair.rejected_ids for pair in built.train)


# ------------------------------------------------------------------------- dpo.precompute_ref


def _counting_deepcopy(monkeypatch, allowed: bool) -> list[int]:
    """Count (or forbid) the frozen reference copy DPO makes for full/freeze tuning."""
    import copy
    import types

    from tunesmith.training.methods import dpo

    calls: list[int] = []

    def deepcopy(obj, memo=None):
        calls.append(1)
        if not allowed:
            raise AssertionError("dpo.precompute_ref made a copy of the model")
        return copy.deepcopy(obj, memo)

    monkeypatch.setattr(dpo, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    return calls


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_precompute_ref_gives_the_live_reference_losses(adapter, tiny_model_dirs, tmp_path, monkeypatch):
    data = _pairs_file(tmp_path / "p.jsonl")
    model_dir = tiny_model_dirs["llama"]
    live_copies = _counting_deepcopy(monkeypatch, allowed=True)
    live = train(load_config(_cfg(model_dir, data, tmp_path / "a", adapter, epochs=2)), show_progress=False)
    assert len(live_copies) == (1 if adapter == "full" else 0)  # the live path's frozen copy (control)

    _counting_deepcopy(monkeypatch, allowed=False)
    cfg = _cfg(model_dir, data, tmp_path / "b", adapter, epochs=2)
    cfg["dpo"] = {"precompute_ref": True}
    precomputed = train(load_config(cfg), show_progress=False)
    assert len(live.losses) == len(precomputed.losses) == 6
    assert precomputed.losses == pytest.approx(live.losses, abs=1e-6)
    assert precomputed.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(_rows(tmp_path / "a"), _rows(tmp_path / "b"), strict=True):
        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ):
            assert b[name] == pytest.approx(a[name], abs=1e-5), name


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_precompute_ref_under_bf16_autocast_is_the_live_reference(adapter, tiny_model_dirs, tmp_path):
    """The reference is computed under the loop's autocast: at step 0 policy == reference exactly, so
    the loss is ln 2 (an fp32 reference against a bf16 policy would be off by the rounding)."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dirs["llama"], _pairs_file(tmp_path / "p.jsonl"), run, adapter, max_steps=1)
    cfg["train"]["precision"] = "bf16"
    cfg["dpo"] = {"precompute_ref": True}
    train(load_config(cfg), show_progress=False)
    first = _rows(run)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_precompute_ref_resume_is_exact(tiny_model_dirs, tmp_path):
    """Full tuning: the resumed run's reference comes from the untrained model again, not the checkpoint."""
    data = _pairs_file(tmp_path / "p.jsonl")
    model_dir = tiny_model_dirs["llama"]

    def cfg(out: Path, **extra) -> dict:
        c = _cfg(model_dir, data, out, "full", epochs=2, **extra)
        c["dpo"] = {"precompute_ref": True}
        return c

    straight = train(load_config(cfg(tmp_path / "a")), show_progress=False)
    first = train(load_config(cfg(tmp_path / "b")), show_progress=False, stop_after_step=2)
    second = train(load_config(cfg(tmp_path / "b", resume="auto")), show_progress=False)
    assert len(straight.losses) == 6
    assert first.losses + second.losses == straight.losses
