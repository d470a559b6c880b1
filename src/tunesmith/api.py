"""The Python API, mirroring the CLI: `tunesmith.train("run.yaml", **{"train.lr": 1e-4})`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config.load import load_config
from tunesmith.config.schema import RunConfig


def train(
    config: str | Path | dict[str, Any] | RunConfig, show_progress: bool = True, **overrides: Any
) -> Path:
    """Train and return the run directory. Overrides use dotted keys: `train(cfg, **{"train.lr": 1e-4})`."""
    from tunesmith.training.loop import train as run_training

    cfg = load_config(config, overrides or None)
    return run_training(cfg, show_progress=show_progress).run_dir
