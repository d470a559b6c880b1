"""`tunesmith estimate`: the memory model's parts, its monotony, what fits a budget, the CLI, and its
per-part formulas against what torch really keeps (saved tensors, optimizer state)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training import estimate as est


@pytest.fixture(scope="module")
def config_only_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with config.json and nothing else: the estimate must need no weights."""
    folder = tmp_path_factory.mktemp("config-only")
    shutil.copy(tiny_model_dirs["llama"] / "config.json", folder / "config.json")
    return folder


def _cfg(model_dir: Path, tmp_path: Path, **sections: Any) -> Any:
    raw = base_config(model_dir, tmp_path / "x.jsonl", tmp_path / "run", **sections)
    return load_config(raw)


@pytest.fixture(scope="module")
def shape(config_only_dir: Path) -> est.ModelShape:
    return est.model_shape(est.read_model_config(str(config_only_dir)))


def _plan(**change: Any) -> est.Plan:
    base = est.Plan(adapter="lora", optimizer="adamw", batch_size=2, seq_len=128, precision="fp32")
    return dataclasses.replace(base, **change)


def test_estimate_reads_only_config_json_and_parts_add_up(config_only_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(config_only_dir, tmp_path)
    result = est.estimate(cfg, calibrate=False)
    assert result.peak_bytes == sum(result.parts.values())
    assert set(result.parts) >= {"weights", "trainable", "gradients", "optimizer", "activations"}
    assert all(v >= 0 for v in result.parts.values())
    assert result.to_json()["peak_bytes"] == result.peak_bytes
    assert list(config_only_dir.iterdir()) == [config_only_dir / "config.json"]


def test_parameter_count_matches_the_real_model(
    shape: est.ModelShape, tiny_model_dirs: dict[str, Path]
) -> None:
    from tunesmith.models.load import load_model

    model = load_model(tiny_model_dirs["llama"])
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert est.weight_bytes(shape, _plan(adapter="full")) == 4 * shape.total_params


def test_monotone_in_batch_and_seq_len(shape: est.ModelShape) -> None:
    for adapter in ("full", "lora", "qlora"):
        peaks = [
            est.estimate_plan(shape, _plan(adapter=adapter, batch_size=b)).peak_bytes for b in (1, 2, 4, 8)
        ]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4
        peaks = [
            est.estimate_plan(shape, _plan(adapter=adapter, seq_len=s)).peak_bytes for s in (64, 256, 1024)
        ]
        assert peaks == sorted(peaks) and len(set(peaks)) == 3


def test_qlora_below_lora_below_full(shape: est.ModelShape) -> None:
    peak = {
        a: est.estimate_plan(shape, _plan(adapter=a, device="cuda")).peak_bytes
        for a in ("qlora", "lora", "full")
    }
    assert peak["qlora"] < peak["lora"] < peak["full"]
    # On CPU the same holds while training; loading an fp32 checkpoint to quantize it can peak higher.
    cpu = {a: est.estimate_plan(shape, _plan(adapter=a)) for a in ("qlora", "lora", "full")}
    training = {a: e.peak_bytes - e.parts["loading"] for a, e in cpu.items()}
    assert training["qlora"] < training["lora"] < training["full"]
    assert cpu["qlora"].peak_bytes == max(
        training["qlora"], est.loading_peak_bytes(shape, cpu["qlora"].plan, cpu["qlora"].parts["weights"])
    )
    weights = {a: est.estimate_plan(shape, _plan(adapter=a)).parts["weights"] for a in ("qlora", "lora")}
    assert weights["qlora"] < weights["lora"]


def test_gradient_checkpointing_lowers_activations(shape: est.ModelShape) -> None:
    plain = est.estimate_plan(shape, _plan(seq_len=1024)).parts["activations"]
    checkpointed = est.estimate_plan(shape, _plan(seq_len=1024, gradient_checkpointing=True)).parts[
        "activations"
    ]
    assert checkpointed < plain


def test_lean_optimizers_keep_less_state(shape: est.ModelShape) -> None:
    state = {
        o: est.estimate_plan(shape, _plan(adapter="full", optimizer=o)).parts["optimizer"]
        for o in ("adamw", "adamw_8bit", "adafactor", "adam_mini", "badam")
    }
    assert state["adafactor"] < state["adamw_8bit"] < state["adam_mini"] < state["adamw"]
    assert state["badam"] < state["adamw"] / shape.layers * 2


def test_budget_picks_the_largest_batch_that_fits(shape: est.ModelShape) -> None:
    plan = _plan(adapter="full")
    at = {
        b: est.estimate_plan(shape, dataclasses.replace(plan, batch_size=b)).peak_bytes for b in range(1, 40)
    }
    budget = (at[11] + at[12]) // 2
    answer = est.what_fits(shape, plan, budget)
    assert answer.max_batch_size == 11
    assert (
        est.estimate_plan(shape, dataclasses.replace(plan, seq_len=answer.max_seq_len)).peak_bytes <= budget
    )
    assert (
        est.estimate_plan(shape, dataclasses.replace(plan, seq_len=answer.max_seq_len + 1)).peak_bytes
        > budget
    )
    fits = {(c["adapter"], c["optimizer"]): c["fits"] for c in answer.choices}
    assert fits[("qlora-4bit", "adamw")] and fits[("full", "adamw")] is (at[2] <= budget)
    assert est.what_fits(shape, plan, 1).max_batch_size is None


def test_memory_warning_only_below_the_estimate(config_only_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(config_only_dir, tmp_path)
    peak = est.estimate(cfg, calibrate=False).peak_bytes
    assert est.memory_warning(cfg, available=peak * 2) is None
    warning = est.memory_warning(cfg, available=peak // 2)
    assert warning is not None and "batch_size" in warning
    assert est.estimate_summary_line(cfg).startswith("estimate: ")


def test_cli_json_is_one_object_with_peak_bytes(
    config_only_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunesmith.cli.main import main

    raw = base_config(config_only_dir, tmp_path / "x.jsonl", tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert (
        main(["estimate", str(path), "train.batch_size=3", "--json", "--no-calibrate", "--budget", "1GB"])
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert payload["peak_bytes"] == sum(payload["parts"].values())
    assert payload["plan"]["batch_size"] == 3
    assert payload["budget"]["budget"] == 2**30 and payload["budget"]["max_batch_size"] >= 3
    assert main(["estimate", str(path), "--no-calibrate"]) == 0
    assert "peak" in capsys.readouterr().out
    assert main(["estimate", str(path), "--budget", "lots"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_calibration_times_one_layer(shape: est.ModelShape) -> None:
    timing = est.calibrate_step_seconds(shape, _plan(seq_len=64), max_tokens=128)
    assert timing["layer_seconds"] > 0 and timing["step_seconds"] > timing["layer_seconds"]
    assert timing["tokens_timed"] == 128


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves in one forward, weights excluded."""
    from tunesmith.training.losses import CausalLMWithLoss

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CausalLMWithLoss(model, chunk_size=4096)(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_activation_formula_matches_saved_tensors(
    adapter: str, tiny_model_dirs: dict[str, Path], shape: est.ModelShape
) -> None:
    """Per decoder layer and token, the formula is within 10% of what autograd really keeps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.models.varlen_attention import NAME, register_varlen_sdpa

    register_varlen_sdpa()
    tokens = 256
    ids = torch.randint(3, 1000, (1, tokens))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(tokens)[None]}
    per_layer = []
    for layers in (1, 2):
        config = est.read_model_config(str(tiny_model_dirs["llama"]))
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=NAME)
        if adapter == "lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
        model.train()
        per_layer.append(_saved_bytes(model, batch))
    measured = (per_layer[1] - per_layer[0]) / tokens
    predicted = est.activation_bytes_per_token_layer(shape, _plan(adapter=adapter))
    assert predicted == pytest.approx(measured, rel=0.1)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "galore", "adam_mini"])
def test_optimizer_state_formula_matches_the_optimizer(
    name: str, tiny_model_dirs: dict[str, Path], shape: est.ModelShape, tmp_path: Path
) -> None:
    from tunesmith.models.load import load_model
    from tunesmith.training.checkpoint import _optimizer_bytes
    from tunesmith.training.optim import make_optimizer

    optim: dict[str, Any] = {"name": name}
    if name == "galore":
        optim["galore"] = {"rank": 16}
    cfg = _cfg(tiny_model_dirs["llama"], tmp_path, adapter={"type": "full"}, optim=optim)
    model = load_model(tiny_model_dirs["llama"])
    optimizer = make_optimizer(model, cfg)
    ids = torch.randint(3, 1000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    plan = est.plan_from_config(cfg, device="cpu")
    predicted = est.optimizer_state_bytes(est.trainable_tensors(shape, plan), plan, shape)
    assert predicted == pytest.approx(_optimizer_bytes(optimizer), rel=0.02)
