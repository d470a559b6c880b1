"""The quickstart on the default model through a pseudo-terminal: what the user sees is tunesmith's own
progress (model load, data, training with tok/s and ETA, evaluation), never a library's bar or warning."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pty_run import noise_in, run_in_pty, screen_lines

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _quickstart(tmp_path: Path, *flags: str) -> tuple[int, str]:
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_COLOR", None)
    command = [
        sys.executable,
        "-m",
        "tunesmith.cli.main",
        *flags,
        "train",
        "examples/quickstart.yaml",
        "train.max_steps=3",
        f"output.dir={tmp_path / 'run'}",
        "output.overwrite=true",
    ]
    return run_in_pty(command, REPO, env, timeout=900)


def test_quickstart_terminal_holds_only_tunesmith_output(tmp_path):
    code, raw = _quickstart(tmp_path)
    lines = screen_lines(raw)
    assert code == 0, "\n".join(lines)
    assert noise_in(raw) == [], "\n".join(lines)
    assert any(line.startswith("✓ loading model default") for line in lines), lines
    assert any(line.startswith("✓ preparing data") for line in lines), lines
    bar = [line for line in lines if line.startswith("step 3/3")]
    assert bar and "tok/s" in bar[-1] and "ETA" in bar[-1], lines
    assert any(line.startswith("step 3: eval loss") for line in lines), lines
    assert lines[-1].startswith("done: 3 steps")


def test_verbose_lets_the_libraries_speak(tmp_path):
    code, raw = _quickstart(tmp_path, "--verbose")
    assert code == 0, "\n".join(screen_lines(raw))
    assert noise_in(raw) != []
