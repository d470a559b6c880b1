"""End to end through the CLI on the real default model (slow: CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tunesmith {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_train_few_steps_then_chat_and_export(tmp_path):
    run = tmp_path / "run"
    _cli("train", "examples/quickstart.yaml", f"output.dir={run}", "train.max_steps=4", "train.save_every=2")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 for r in steps)
    assert any("eval_loss" in r for r in rows)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    answer = _cli("chat", str(run), "--prompt", "What is your name?", "--max-new-tokens", "24").stdout.strip()
    assert answer and "<|im_end|>" not in answer and "<|im_start|>" not in answer

    exported = tmp_path / "exported"
    said = _cli("export", str(run), "--merge", "--out", str(exported)).stdout
    assert str(exported) in said
    _assert_export_matches_the_run(run, exported)


def _assert_export_matches_the_run(run: Path, exported: Path) -> None:
    """The merged export, loaded by plain transformers, gives the trained adapter model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.infer.loading import load_for_inference

    merged = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    adapter_model, run_tokenizer = load_for_inference(str(run))
    assert tokenizer.chat_template == run_tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is your name?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = adapter_model(**ids).logits
        got = merged(**ids).logits
        with adapter_model.disable_adapter():
            base = adapter_model(**ids).logits
    assert float((expected - base).abs().max()) > 1e-2  # four steps moved the model: the check has teeth
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


def test_config_error_is_one_clear_line_before_any_model_loads(tmp_path):
    result = _cli("train", "examples/quickstart.yaml", "train.lr=fast", check=False)
    assert result.returncode == 2
    assert 'train.lr: expected a positive number, got "fast"' in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_hub_model_says_offline_not_a_stack_trace(tmp_path):
    result = _cli(
        "train",
        "examples/quickstart.yaml",
        "model=someorg/not-a-real-model",
        f"output.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 2
    assert "never downloads" in result.stderr and "Traceback" not in result.stderr


def test_a_gguf_file_loads_as_a_model(tmp_path, monkeypatch):
    """The .gguf source converts once into the cache and then loads like any model directory."""
    from tunesmith.models.default_model import default_gguf_path
    from tunesmith.models.load import load_model, resolve_model_dir

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    model_dir = resolve_model_dir(str(default_gguf_path()))
    assert model_dir.is_relative_to(tmp_path / "cache")
    assert resolve_model_dir(str(default_gguf_path())) == model_dir  # cached: no second conversion
    model = load_model(model_dir)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
