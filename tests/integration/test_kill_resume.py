"""kill -9 at moments inside a run (between steps and inside checkpoint writes), then --resume:
the losses, gradient norms and final adapter equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import base_config, write_chat_jsonl

pytestmark = pytest.mark.slow

ROWS = [(f"Question {i}: what comes after {i}?", f"After {i} comes {i + 1}.") for i in range(16)]


def _write_config(tmp_path: Path, model_dir: Path, data: Path, out: Path) -> Path:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "lora", "r": 4},
        train={"epochs": 2, "batch_size": 2, "grad_accum": 2, "save_every": 1, "save_total_limit": 2},
    )
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli.main", "train", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if "loss" in r]


def _kill_after(process: subprocess.Popen, out: Path, step: int, delay: float) -> None:
    deadline = time.monotonic() + 300
    while len(_steps(out)) < step:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)  # land somewhere in the next step or inside the checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_kill_9_then_resume_is_bit_identical(tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir = tiny_model_dirs["llama"]
    straight_out = tmp_path / "straight"
    straight = _train(_write_config(tmp_path, model_dir, data, straight_out))
    assert straight.wait() == 0, straight.stderr.read().decode()

    out = tmp_path / "killed"
    config = _write_config(tmp_path, model_dir, data, out)
    for step, delay in ((1, 0.0), (3, 0.003), (5, 0.02)):
        process = _train(config, *(["--resume"] if step > 1 else []))
        _kill_after(process, out, step, delay)
    final = _train(config, "--resume")
    assert final.wait() == 0, final.stderr.read().decode()

    expected, got = _steps(straight_out), _steps(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in expected]
    a = load_file(straight_out / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
