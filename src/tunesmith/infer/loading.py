"""Load something to run: a finished run directory, a PEFT adapter directory, or any model spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.models.load import is_hub_id, load_model, load_tokenizer, resolve_model_dir


def load_for_inference(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Return (model, tokenizer) in eval mode; LoRA runs come back as an unmerged PeftModel."""
    path = Path(spec).expanduser()
    if _names_a_run(spec, path):
        from tunesmith.training.run_dir import read_run_info

        info = read_run_info(path)  # names a missing or unfinished run and says what to do
        refuse_reward_run(path, info, "generate text")
        target = path / info["kind"]
        if info["kind"] == "adapter":
            return _load_adapter(target, Path(info["base_model"]), dtype)
        return load_model(target, dtype).eval(), load_tokenizer(target)
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return _load_adapter(path, resolve_model_dir(config["base_model_name_or_path"]), dtype)
    model_dir = resolve_model_dir(spec)
    return load_model(model_dir, dtype).eval(), load_tokenizer(model_dir)


def refuse_reward_run(run_dir: Path, info: dict[str, Any], what: str) -> None:
    """A reward model's head scores text; its language-model head was never trained to answer."""
    if info.get("method") == "reward":
        from tunesmith.training.errors import RunDirError

        raise RunDirError(
            f"{run_dir} is a reward model: it cannot {what}, it scores answers. Use: "
            f'tunesmith score {run_dir} --prompt "..." --response "..."'
        )


def _names_a_run(spec: str, path: Path) -> bool:
    """A run directory, finished or not, or a missing path that cannot be a hub id: both are runs'
    business, so a half-written run is not mistaken for a model directory without config.json."""
    if not path.exists():
        return spec != "default" and path.suffix != ".gguf" and not is_hub_id(spec)
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return False
    from tunesmith.training.run_dir import RUN_INFO, holds_run

    return (path / RUN_INFO).is_file() or (path / "config.yaml").is_file() or holds_run(path)


def _load_adapter(adapter_dir: Path, base_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from peft import PeftModel

    if not base_dir.is_dir():
        raise FileNotFoundError(f"the base model of {adapter_dir} is gone: {base_dir}")
    base = load_model(base_dir, dtype)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    return model.eval(), load_tokenizer(tokenizer_dir)
