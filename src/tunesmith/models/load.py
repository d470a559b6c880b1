"""Resolve a `model:` spec to a local directory and load model + tokenizer from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunesmith.models.default_model import default_model_dir
from tunesmith.models.gguf_cache import ensure_converted

log = logging.getLogger(__name__)


SOURCES_HINT = "set model: to 'default', a Hugging Face model directory or a .gguf file"


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
    if path.exists():
        raise ModelNotFound(f"model: {path} is a file, not a model directory or a .gguf file; {SOURCES_HINT}")
    if not is_hub_id(spec):
        raise ModelNotFound(f"model: {path} does not exist; {SOURCES_HINT}")
    cached = _hub_cache_snapshot(spec)
    if cached is not None:
        return cached
    raise ModelNotFound(
        f"model: {spec!r} does not exist here as a directory or .gguf file, and no copy of a Hugging Face model "
        "of that id is in the local cache. tunesmith never downloads at run time (this machine may be offline): "
        f"download the model where there is network (e.g. `hf download {spec} --local-dir DIR`), copy DIR here, "
        "and set model: DIR"
    )


def is_hub_id(spec: str) -> bool:
    """Whether `spec` could name a hub model (`org/name` or `name`); anything else can only be a local path."""
    return (
        spec.count("/") <= 1
        and not spec.startswith(("/", ".", "~"))
        and not spec.endswith("/")
        and "\\" not in spec
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
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
    adapter: Any = None,
) -> Any:
    """`adapter`: a QLoRA adapter config loads the linear layers quantized (bitsandbytes) as they are
    read; a checkpoint saved quantized (its config.json has a quantization_config) loads as it is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.models.attention import attention_for_model
    from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA
    from tunesmith.models.varlen_attention import register_varlen_sdpa

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    attention = attention_for_model(attention, config)
    if attention == VARLEN_SDPA:
        register_varlen_sdpa()
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attention,
        **_quantized_load(model_dir, adapter),
    )


def _quantized_load(model_dir: Path, adapter: Any) -> dict[str, Any]:
    from tunesmith.config.schema import QloraAdapter
    from tunesmith.models import quantization

    if quantization.checkpoint_quantization(model_dir) is not None:
        quantization.require_bitsandbytes()
        return {"device_map": quantization.load_device_map()}
    if isinstance(adapter, QloraAdapter):
        return {
            "quantization_config": quantization.quantization_config(adapter),
            "device_map": quantization.load_device_map(),
        }
    return {}


def load_model_and_tokenizer(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attention: str = "sdpa",
    adapter: Any = None,
) -> tuple[Any, Any, Path]:
    """`adapter` (the run's adapter config): QLoRA loads the base quantized; `new_special_tokens` are
    added to the tokenizer (and the embedding grown) here, before any data is tokenized."""
    model_dir = resolve_model_dir(spec)
    log.info("loading model from %s (attention: %s)", model_dir, attention)
    model = load_model(model_dir, dtype, trust_remote_code, attention, adapter)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    tokens = getattr(adapter, "new_special_tokens", None)
    if tokens:
        from tunesmith.models.adapters import add_special_tokens

        add_special_tokens(model, tokenizer, list(tokens))
    return model, tokenizer, model_dir
