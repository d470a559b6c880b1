"""Write a model (or adapter) with its tokenizer so that a reader never sees half a directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def save_model_dir(model: Any, tokenizer: Any, out: Path) -> Path:
    """save_pretrained (safetensors) + tokenizer into a staging folder, then one rename onto `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
