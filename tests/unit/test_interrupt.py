"""Ctrl-C during training saves a complete checkpoint and exits cleanly; --resume continues from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import base_config
from tunesmith.training.checkpoint import committed_checkpoints


def test_ctrl_c_saves_checkpoint_and_resume_continues(tiny_model_dirs, chat_file, tmp_path):
    run = tmp_path / "run"
    cfg = base_config(
        tiny_model_dirs["llama"],
        chat_file,
        run,
        train={"max_steps": 100000, "batch_size": 2, "lr": 1e-3, "log_every": 1},
    )
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "tunesmith.cli.main", "train", str(config_path)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stdout
    checkpoints = committed_checkpoints(run / "checkpoints")
    assert len(checkpoints) == 1
    saved_step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert saved_step >= 3

    resumed = subprocess.run(
        command + ["--resume", "train.max_steps=" + str(saved_step + 2)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, saved_step + 3))
