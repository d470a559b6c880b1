"""The lm-eval bridge: model arguments for each kind of model spec, the missing-extra error, and a
run through lm-eval that scores the same numbers as `evaluate_mc` (base model and a LoRA adapter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from test_eval_mc import write_harness_tasks, write_task

from conftest import make_tiny_model_dir
from tunesmith.config.load import ConfigError
from tunesmith.config.schema import EvalTask
from tunesmith.eval import harness
from tunesmith.eval.harness import harness_model_args, run_harness
from tunesmith.eval.mc import evaluate_mc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("harness") / "llama", tokenizer_dir, seed=5)


def test_missing_lm_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        harness.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'tunesmith\[eval\]'"):
        run_harness("default", ["mmlu"])


def test_model_args_for_each_spec(tiny_dir: Path, tmp_path: Path) -> None:
    assert harness_model_args(str(tiny_dir)) == f"pretrained={tiny_dir},dtype=float32"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_dir)}))
    assert harness_model_args(str(adapter)) == f"pretrained={tiny_dir},peft={adapter},dtype=float32"
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"kind": "adapter", "base_model": str(tiny_dir), "method": "sft"})
    )
    assert harness_model_args(str(run)) == f"pretrained={tiny_dir},peft={run / 'adapter'},dtype=float32"
    (run / "run.json").write_text(json.dumps({"kind": "model", "method": "sft"}))
    assert harness_model_args(str(run)) == f"pretrained={run / 'model'},dtype=float32"


@pytest.mark.slow  # lm-eval indexes its whole task library first (~20 s)
def test_unknown_task_is_a_config_error(tiny_dir: Path) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError, match="no task 'no_such_task_xyz'"):
        run_harness(str(tiny_dir), ["no_such_task_xyz"])


def _compare(spec: str, model: Any, tokenizer: Any, tmp_path: Path) -> None:
    """lm-eval through the bridge and evaluate_mc score the same per-item log-likelihoods."""
    folder = tmp_path / "harness"
    folder.mkdir()
    names = write_harness_tasks(folder)
    results = {
        r.task: r for r in run_harness(spec, names, shots=1, log_samples=True, include_path=str(folder))
    }
    ours = evaluate_mc(
        model, tokenizer, EvalTask(kind="mc", path=str(write_task(tmp_path)), shots=1), log_samples=True
    )
    for name in names:
        subject = name.removeprefix("t_")
        theirs = results[f"harness:{name}"]
        mine = [s for s in ours.samples or [] if s["subject"] == subject]
        assert theirs.n == len(mine)
        assert theirs.metrics["acc"] == ours.metrics[f"acc/{subject}"]
        assert theirs.per_item["acc"] == [s["acc"] for s in mine]
        for a, b in zip(mine, sorted(theirs.samples or [], key=lambda s: s["doc_id"]), strict=True):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


@pytest.mark.slow
def test_harness_scores_like_evaluate_mc(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from tunesmith.models.load import load_model, load_tokenizer

    _compare(str(tiny_dir), load_model(tiny_dir).eval(), load_tokenizer(tiny_dir), tmp_path)


@pytest.mark.slow
def test_harness_loads_a_lora_adapter_on_its_base(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.load import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained-looking adapter: not a no-op
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    _compare(str(adapter), model.eval(), load_tokenizer(tiny_dir), tmp_path)
