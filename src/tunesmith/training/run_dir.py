"""The run directory: created safely, and filled with the final adapter or model at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.models.save import save_model_dir

RUN_INFO = "run.json"


class RunDirError(RuntimeError):
    pass


def prepare_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to resume or overwrite."""
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resuming:
        if not overwrite:
            raise RunDirError(
                f"output.dir {run_dir} already holds a run; continue it with train.resume=auto, replace it "
                "with output.overwrite=true, or choose another output.dir"
            )
        for name in ("checkpoints", "adapter", "model", "metrics.jsonl", "curves.png", RUN_INFO):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def save_final(run_dir: Path, model: Any, tokenizer: Any, cfg: RunConfig, base_model_dir: Path) -> Path:
    """LoRA -> `adapter/` (standard PEFT files); full/freeze -> `model/` (safetensors); tokenizer beside it."""
    is_lora = isinstance(cfg.adapter, LoraAdapter)
    out = save_model_dir(model, tokenizer, run_dir / ("adapter" if is_lora else "model"))
    info = {
        "base_model": str(base_model_dir),
        "model_spec": cfg.model,
        "kind": out.name,
        "method": cfg.method,
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return out


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} is not a finished tunesmith run (no {RUN_INFO}); did training complete?"
        )
    return json.loads(path.read_text(encoding="utf-8"))
