"""The Python API mirrors the CLI: a config path or dict plus dotted overrides, returning the run dir."""

from __future__ import annotations

import json

import yaml

import tunesmith
from conftest import base_config


def test_train_with_overrides_returns_the_run_directory(tiny_model_dirs, chat_file, tmp_path):
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(
        yaml.safe_dump(base_config(tiny_model_dirs["qwen2"], chat_file, tmp_path / "ignored"))
    )
    run = tunesmith.train(
        config_path,
        show_progress=False,
        **{"output.dir": str(tmp_path / "api-run"), "train.max_steps": 3, "train.lr": 1e-3},
    )
    assert run == tmp_path / "api-run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["train"]["lr"] == 1e-3
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3]
    assert not (tmp_path / "ignored").exists()
