"""Through a pseudo-terminal (what a user sees): tunesmith's own progress, and no library bar or warning."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import base_config
from pty_run import noise_in, run_in_pty, screen_lines

REPO = Path(__file__).resolve().parents[2]


def test_a_terminal_shows_own_progress_and_no_library_noise(tiny_model_dirs, chat_file, tmp_path):
    cfg = base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "run", train={"max_steps": 2})
    cfg["train"]["gradient_checkpointing"] = True  # the path that used to print a FutureWarning
    cfg["data"]["eval"] = [{"path": str(chat_file)}]
    raw, lines = _train_in_a_terminal(cfg, tmp_path)
    assert "\x1b[" in raw  # a terminal gets the live display, not plain lines
    assert any(line.startswith("estimate: ") and "process peak RSS" in line for line in lines), lines
    assert any(line.startswith("✓ loading model") for line in lines), lines
    assert any(line.startswith("✓ preparing data") for line in lines), lines
    bar = [line for line in lines if line.startswith("step 2/2")]
    assert bar and "tok/s" in bar[-1] and "ETA" in bar[-1], lines
    assert any(line.startswith("step 2: eval loss") for line in lines), lines


@pytest.mark.slow  # MLflow's first start migrates its SQLite store: tens of seconds
def test_trackers_add_no_library_noise_to_the_terminal(tiny_model_dirs, chat_file, tmp_path):
    cfg = base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "run", train={"max_steps": 2})
    cfg["tracking"] = {"backends": ["tensorboard", "mlflow"]}
    _, lines = _train_in_a_terminal(cfg, tmp_path, unset=("MLFLOW_TRACKING_URI",))
    assert any(line.startswith("tracking to") for line in lines), lines
    assert (tmp_path / "mlflow.db").is_file()  # the run logged where the default says


def _train_in_a_terminal(cfg: dict, tmp_path: Path, unset: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """`tunesmith train` on `cfg` in a pseudo-terminal: what reached the screen, raw and as lines,
    after checking that it succeeded and showed no library bar or warning."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    for name in ("NO_COLOR", *unset):
        env.pop(name, None)
    code, raw = run_in_pty(
        [sys.executable, "-m", "tunesmith.cli.main", "train", str(config)], REPO, env, timeout=300
    )
    lines = screen_lines(raw)
    assert code == 0, "\n".join(lines)
    assert noise_in(raw) == [], "\n".join(lines)
    return raw, lines
