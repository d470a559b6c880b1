"""Load something to run: a finished run directory, a PEFT adapter directory, or any model spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.models.load import load_model, load_tokenizer, resolve_model_dir


def load_for_inference(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Return (model, tokenizer) in eval mode; LoRA runs come back as an unmerged PeftModel."""
    path = Path(spec).expanduser()
    if (path / "run.json").is_file():
        from tunesmith.training.run_dir import read_run_info

        info = read_run_info(path)
        target = path / info["kind"]
        if info["kind"] == "adapter":
            return _load_adapter(target, Path(info["base_model"]), dtype)
        return load_model(target, dtype).eval(), load_tokenizer(target)
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return _load_adapter(path, resolve_model_dir(config["base_model_name_or_path"]), dtype)
    model_dir = resolve_model_dir(spec)
    return load_model(model_dir, dtype).eval(), load_tokenizer(model_dir)


def _load_adapter(adapter_dir: Path, base_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from peft import PeftModel

    if not base_dir.is_dir():
        raise FileNotFoundError(f"the base model of {adapter_dir} is gone: {base_dir}")
    base = load_model(base_dir, dtype)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    return model.eval(), load_tokenizer(tokenizer_dir)
