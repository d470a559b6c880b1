"""The terminal shows tunesmith's own lines only; library bars and warnings appear with -v."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import base_config

NOISE = ("Loading weights", "Warning", "warnings.warn", "it/s]")


def _train(tiny_model_dirs, chat_file: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    cfg = base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "run", train={"max_steps": 1})
    cfg["train"]["gradient_checkpointing"] = True  # the path that used to print a FutureWarning
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "tunesmith.cli.main", *flags, "train", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_training_output_holds_no_library_noise(tiny_model_dirs, chat_file, tmp_path):
    done = _train(tiny_model_dirs, chat_file, tmp_path)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "step 1/1" in output
    assert [marker for marker in NOISE if marker in output] == []


@pytest.mark.slow
def test_verbose_lets_library_output_through(tiny_model_dirs, chat_file, tmp_path):
    done = _train(tiny_model_dirs, chat_file, tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    assert "DEBUG" in done.stderr
    assert any(marker in done.stdout + done.stderr for marker in NOISE)
