"""Convert a GGUF file once into a cached safetensors model directory.

transformers de-quantizes a GGUF to fp32 on every load (tens of seconds) and refuses
`save_pretrained` on the result, so we rebuild a plain model from its config, copy the
weights in, and save that; later loads read safetensors in under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

READY_MARKER = "tunesmith-converted.txt"


def cache_root() -> Path:
    """`$TUNESMITH_CACHE`, else `$XDG_CACHE_HOME/tunesmith`, else `~/.cache/tunesmith`."""
    if env := os.environ.get("TUNESMITH_CACHE"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tunesmith"


def gguf_cache_dir(gguf_path: Path) -> Path:
    """A cache directory keyed by the file's name, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def ensure_converted(gguf_path: Path, target: Path | None = None) -> Path:
    """Return a directory holding the GGUF's model as safetensors + tokenizer, converting once."""
    gguf_path = Path(gguf_path)
    target = target or gguf_cache_dir(gguf_path)
    if (target / READY_MARKER).is_file():
        return target
    log.info("converting %s to safetensors in %s (once; about 30 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        (staging / READY_MARKER).write_text(f"converted from {gguf_path.name}\n", encoding="utf-8")
        if target.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
