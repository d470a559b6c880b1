"""Write a model (or adapter) with its tokenizer so that a reader never sees half a directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tunesmith.training.durable import commit_dir


def save_model_dir(model: Any, tokenizer: Any, out: Path) -> Path:
    """save_pretrained (safetensors) + tokenizer into a staging folder, fsynced, then committed onto `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        from tunesmith.models.adapters import adapter_save_kwargs

        # PiSSA/OLoRA adapters are converted to apply to the unchanged base; new tokens save their rows only
        model.save_pretrained(staging, safe_serialization=True, **adapter_save_kwargs(model))
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_dir(staging, out)
    return out
