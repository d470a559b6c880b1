"""Load something to run: a finished run directory, a PEFT adapter directory, or any model spec.

A run is loaded the way it was trained: with the `trust_remote_code` it recorded, and with the chat
template training used on its tokenizer (runs saved before the tokenizer carried that template get
it from their `config.yaml`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tunesmith.models.load import is_hub_id, load_model, load_tokenizer, resolve_model_dir

log = logging.getLogger(__name__)


def load_for_inference(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Return (model, tokenizer) in eval mode; LoRA runs come back as an unmerged PeftModel."""
    path = Path(spec).expanduser()
    if _names_a_run(spec, path):
        from tunesmith.training.run_dir import read_run_info

        info = read_run_info(path)  # names a missing or unfinished run and says what to do
        refuse_reward_run(path, info, "generate text")
        target = path / info["kind"]
        trust = recorded_trust((path, info))
        if info["kind"] == "adapter":
            model, tokenizer = _load_adapter(target, Path(info["base_model"]), dtype, trust)
        else:
            model, tokenizer = load_model(target, dtype, trust).eval(), load_tokenizer(target, trust)
        return model, with_run_template(tokenizer, path, info)
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        run = enclosing_run(path)
        base_dir = resolve_model_dir(config["base_model_name_or_path"])
        model, tokenizer = _load_adapter(path, base_dir, dtype, recorded_trust(run))
        return model, with_run_template(tokenizer, *run) if run else tokenizer
    model_dir = resolve_model_dir(spec)
    run = enclosing_run(model_dir)
    trust = recorded_trust(run)
    model, tokenizer = load_model(model_dir, dtype, trust).eval(), load_tokenizer(model_dir, trust)
    return model, with_run_template(tokenizer, *run) if run else tokenizer


def recorded_trust(run: tuple[Path, dict[str, Any]] | None) -> bool:
    """The `trust_remote_code` the run recorded (runs written before it was recorded: False)."""
    return bool(run and run[1].get("trust_remote_code", False))


def with_run_template(tokenizer: Any, run_dir: Path, info: dict[str, Any]) -> Any:
    """`tokenizer` with the chat template the run trained with.

    Runs that saved it on their tokenizer (run.json says so) are left alone; for older runs the
    template comes from their config.yaml. A template that cannot be resolved any more (a .jinja
    file since moved) leaves the tokenizer's own, with a warning.
    """
    from tunesmith.training.run_dir import TEMPLATE_SAVED

    if info.get(TEMPLATE_SAVED):
        return tokenizer
    from tunesmith.data.templates import ChatTemplateError, training_template

    try:
        template, _ = training_template(run_dir, tokenizer)
    except ChatTemplateError as exc:
        log.warning("%s: cannot restore the chat template training used: %s", run_dir, exc)
        return tokenizer
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _run_at(path: Path) -> tuple[Path, dict[str, Any]] | None:
    from tunesmith.training.run_dir import RUN_INFO

    marker = path / RUN_INFO
    if not marker.is_file():
        return None
    return path, json.loads(marker.read_text(encoding="utf-8"))


def enclosing_run(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """(run dir, run.json) when `path` is a finished run's `adapter/` or `model/` directory."""
    run = _run_at(path.parent)
    if run is None or path.name != run[1].get("kind"):
        return None
    return run


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


def _load_adapter(
    adapter_dir: Path, base_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    from peft import PeftModel

    if not base_dir.is_dir():
        raise FileNotFoundError(f"the base model of {adapter_dir} is gone: {base_dir}")
    base = load_model(base_dir, dtype, trust_remote_code)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # the run added special tokens
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter holds the rows
    model = PeftModel.from_pretrained(base, adapter_dir)
    return model.eval(), tokenizer
