"""`tunesmith train --processes 2` from the command line: the same run as `torchrun -m tunesmith
train`, one voice (rank 0), and Ctrl-C stops every rank at the same step with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import base_config, write_chat_jsonl
from tunesmith.training.metrics import read_metrics

pytestmark = pytest.mark.slow

ROWS = [(f"Question {i}?", " ".join(["word"] * (1 + (i * 7) % 30))) for i in range(12)]


def _write_config(tmp_path: Path, model_dir: Path, name: str, **train: Any) -> Path:
    data = write_chat_jsonl(tmp_path / "train.jsonl", ROWS)
    raw = base_config(
        model_dir,
        data,
        tmp_path / name,
        data={"train": [{"path": str(data)}], "seq_len": 64, "packing": True},
        train={"epochs": 1, "batch_size": 1, "lr": 1e-2, "max_grad_norm": 1.0, **train},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_processes_flag_equals_torchrun(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    ours = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            str(_write_config(tmp_path, model_dir, "ours")),
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert ours.stdout.count("done:") == 1  # rank 0 alone reports
    torchrun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "tunesmith",
            "train",
            str(_write_config(tmp_path, model_dir, "torchrun")),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert torchrun.stdout.count("done:") == 1
    ours_losses, torchrun_losses = _losses(tmp_path / "ours"), _losses(tmp_path / "torchrun")
    assert len(ours_losses) >= 3 and ours_losses == pytest.approx(torchrun_losses, abs=1e-6)


def test_ctrl_c_stops_all_ranks_with_a_checkpoint(tiny_model_dirs, tmp_path):
    config = _write_config(tmp_path, tiny_model_dirs["llama"], "run", epochs=40)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", str(config), "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,  # its own process group: Ctrl-C as a terminal sends it, to every rank
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and _losses(run_dir):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert out.count("resume with:") == 1  # rank 0 alone reports
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one row per step: only rank 0 wrote
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and checkpoints[-1].name == f"step-{steps[-1]:08d}"
    status = yaml.safe_load((run_dir / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "interrupted"
