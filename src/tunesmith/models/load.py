"""Resolve a `model:` spec to a local directory and load model + tokenizer from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunesmith.models.default_model import default_model_dir
from tunesmith.models.gguf_cache import ensure_converted

log = logging.getLogger(__name__)


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_dir(spec: str) -> Path:
    """`default` | a local HF model directory | a .gguf file | a hub id already in the local HF cache."""
    if spec == "default":
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model: GGUF file not found: {path}")
        return ensure_converted(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"model: {path} is a directory but has no config.json (not a Hugging Face model)"
            )
        return path
    cached = _hub_cache_snapshot(spec)
    if cached is not None:
        return cached
    raise ModelNotFound(
        f"model: {spec!r} is not a local directory or .gguf file, and no copy is in the local Hugging Face cache. "
        "tunesmith never downloads at run time (this machine may be offline): download the model where there is "
        f"network (e.g. `hf download {spec} --local-dir DIR`), copy DIR here, and set model: DIR"
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or an invalid id: both mean "not available offline"
        return None


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attention: str = "sdpa",
) -> Any:
    from transformers import AutoModelForCausalLM

    from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA
    from tunesmith.models.varlen_attention import register_varlen_sdpa

    if attention == VARLEN_SDPA:
        register_varlen_sdpa()
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attention
    )


def load_model_and_tokenizer(
    spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, attention: str = "sdpa"
) -> tuple[Any, Any, Path]:
    model_dir = resolve_model_dir(spec)
    log.info("loading model from %s (attention: %s)", model_dir, attention)
    model = load_model(model_dir, dtype, trust_remote_code, attention)
    return model, load_tokenizer(model_dir, trust_remote_code), model_dir
