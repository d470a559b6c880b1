"""Mistakes users make on the command line end in one `error:` line (rc 2) that names the problem and
the fix, never in a Python traceback."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import base_config
from tunesmith.cli.main import main

USER_ERROR = 2


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `tunesmith ARGS` in a fresh process, as a user would, with a private model cache."""
    env = {**os.environ, "TUNESMITH_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tunesmith.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line a user error prints; fails on a traceback or any other rc."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == USER_ERROR, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _main_error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The single `error:` line of `tunesmith ARGS` run in this process (transformers is already
    imported here, which a fresh process would spend seconds on)."""
    rc = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert rc == USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _write_tiny_gguf(path: Path) -> Path:
    """A real, readable GGUF of two small tensors, made with the `gguf` package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf.GGUFReader(path)  # the untruncated file is valid, so only the truncation can fail below
    return path


def _truncate(path: Path, size: int) -> Path:
    data = path.read_bytes()
    assert size < len(data)
    path.write_bytes(data[:size])
    return path


def _unfinished_run(tmp_path: Path) -> Path:
    """What a stopped run leaves behind: its config and a checkpoint, but no run.json or final model."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("model: default\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    return run


def test_truncated_gguf_says_the_file_is_incomplete_and_to_copy_it_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    model = _write_tiny_gguf(tmp_path / "tiny.gguf")
    _truncate(model, model.stat().st_size - 200)  # cut inside the tensor data
    line = _main_error_line(capsys, "chat", str(model), "--prompt", "hi")
    assert line.startswith(f"error: model: {model} is not a complete, valid GGUF file")
    assert "cut short" in line and "copy or download the file again" in line
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-converted is left behind


def test_gguf_of_100_bytes_says_the_file_is_incomplete(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    model = _truncate(_write_tiny_gguf(tmp_path / "tiny.gguf"), 100)  # cut inside the header
    line = _main_error_line(capsys, "chat", str(model), "--prompt", "hi")
    assert line.startswith(f"error: model: {model} is not a complete, valid GGUF file (100 bytes;")
    assert "copy or download the file again" in line


def test_file_that_is_not_gguf_at_all_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "notes.gguf"
    model.write_text("just some text\n" * 10, encoding="utf-8")
    line = _main_error_line(capsys, "chat", str(model), "--prompt", "hi")
    assert line.startswith(f"error: model: {model} is not a GGUF file (it does not start with the GGUF magic")


def test_flex_attention_on_cpu_is_a_config_error_before_the_run_starts(tmp_path, chat_file):
    config = tmp_path / "run.yaml"
    run = tmp_path / "run"
    config.write_text(yaml.safe_dump(base_config(tmp_path / "no-model", chat_file, run)), encoding="utf-8")
    line = _one_error_line(_cli("train", str(config), "train.attention=flex_attention", cwd=tmp_path))
    assert line.startswith("error: train.attention: flex_attention cannot train on a CPU")
    assert "use varlen_sdpa" in line
    assert not run.exists()  # refused before the run directory was created


def test_export_of_a_missing_directory_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "nope"
    line = _one_error_line(_cli("export", str(missing), "--out", str(tmp_path / "out"), cwd=tmp_path))
    assert line == f"error: {missing} does not exist"


def test_export_of_a_missing_relative_directory_does_not_suggest_a_download(tmp_path):
    line = _one_error_line(_cli("export", "runs/nope", "--out", "out", cwd=tmp_path))
    assert line == "error: runs/nope does not exist"


def test_chat_with_a_missing_directory_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "nope"
    line = _one_error_line(_cli("chat", str(missing), "--prompt", "hi", cwd=tmp_path))
    assert line == f"error: {missing} does not exist"


def test_export_of_an_unfinished_run_says_to_resume_it(tmp_path):
    run = _unfinished_run(tmp_path)
    line = _one_error_line(_cli("export", str(run), "--merge", "--out", str(tmp_path / "out"), cwd=tmp_path))
    assert line.startswith(f"error: {run}: this run has not finished (no run.json)")
    assert f"`tunesmith train {run / 'config.yaml'} --resume`" in line
    assert "config.json" not in line


def test_chat_with_an_unfinished_run_says_to_resume_it(tmp_path):
    run = _unfinished_run(tmp_path)
    line = _one_error_line(_cli("chat", str(run), "--prompt", "hi", cwd=tmp_path))
    assert line.startswith(f"error: {run}: this run has not finished (no run.json)")
    assert f"`tunesmith train {run / 'config.yaml'} --resume`" in line


def _lora_config(tmp_path: Path, model_dir: Path, data: Path) -> Path:
    """A config whose adapter section is LoRA with keys that full fine-tuning does not have."""
    adapter = {"type": "lora", "r": 4, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    cfg = base_config(model_dir, data, tmp_path / "run", adapter=adapter, train={"max_steps": 1})
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_adapter_type_full_override_switches_a_lora_config(tiny_model_dirs, chat_file, tmp_path, capsys):
    config = _lora_config(tmp_path, tiny_model_dirs["llama"], chat_file)
    rc = main(["train", str(config), "adapter.type=full"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "error" not in captured.err
    info = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert info["kind"] == "model"  # full fine-tuning saved a whole model, not an adapter


def test_adapter_type_full_with_a_lora_key_in_the_same_overrides_names_that_key(
    tiny_model_dirs, chat_file, tmp_path, capsys
):
    config = _lora_config(tmp_path, tiny_model_dirs["llama"], chat_file)
    assert main(["train", str(config), "adapter.type=full", "adapter.r=8"]) == USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config:")
    assert "adapter.r: unknown key" in err
    assert "adapter.dropout" not in err and "adapter.targets" not in err  # keys the user never typed
    assert not (tmp_path / "run").exists()


def _interrupt_after_first_step(metrics: Path, done: threading.Event) -> None:
    """Press Ctrl-C once the first step is logged: by then the loop's Ctrl-C handler is installed."""
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text(encoding="utf-8").strip():
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.05)


def test_ctrl_c_hint_resumes_from_the_run_directory_config(tiny_model_dirs, chat_file, tmp_path, capsys):
    run = tmp_path / "run"
    train = {"max_steps": 100000, "log_every": 1, "lr": 1e-3}
    config = tmp_path / "my-run.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model_dirs["llama"], chat_file, run, train=train)))
    done = threading.Event()
    presser = threading.Thread(target=_interrupt_after_first_step, args=(run / "metrics.jsonl", done))
    presser.start()
    try:
        rc = main(["train", str(config), "train.lr=2e-3"])
    finally:
        done.set()
        presser.join()
    captured = capsys.readouterr()
    assert rc == 130, captured.err
    last = captured.out.strip().splitlines()[-1]
    expected = f"resume with: tunesmith train {shlex.quote(str(run / 'config.yaml'))} --resume"
    assert last.startswith("stopped at step ") and last.endswith(expected), last
    assert str(config) not in last  # the user's YAML lacks the overrides; the run's config.yaml has them
