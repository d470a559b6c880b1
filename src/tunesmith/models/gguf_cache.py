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
GGUF_MAGIC = b"GGUF"
REFETCH_HINT = "copy or download the file again, or set model: to a complete .gguf file or a model directory"


class InvalidGGUF(ValueError):
    """A `.gguf` that cannot be read: not GGUF at all, or cut short (an interrupted download or copy)."""


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


def check_gguf(gguf_path: Path, hint: str = REFETCH_HINT) -> None:
    """Raise InvalidGGUF, naming the file and the fix, when its header or tensor table cannot be read.

    Reading the tables of a real model takes seconds, so callers run this only once loading failed,
    to tell a broken file from any other cause."""
    from gguf import GGUFReader

    with open(gguf_path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    size = gguf_path.stat().st_size
    if magic != GGUF_MAGIC:
        raise InvalidGGUF(
            f"model: {gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes; "
            f"{size} bytes); {hint}"
        )
    try:
        GGUFReader(gguf_path)
    except Exception as exc:  # any reader failure on this file means the same thing to the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidGGUF(
            f"model: {gguf_path} is not a complete, valid GGUF file ({size} bytes; reading it failed: "
            f"{reason}); a download or copy that was cut short looks like this: {hint}"
        ) from None


def ensure_converted(gguf_path: Path, target: Path | None = None, hint: str = REFETCH_HINT) -> Path:
    """Return a directory holding the GGUF's model as safetensors + tokenizer, converting once.

    `hint` says how to get a good copy when the file turns out to be broken."""
    gguf_path = Path(gguf_path)
    target = target or gguf_cache_dir(gguf_path)
    if (target / READY_MARKER).is_file():
        return target
    from tunesmith.training.progress import phase

    log.info("converting %s to safetensors in %s (once; about 30 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        with phase(f"converting {gguf_path.name} to safetensors (once; later loads take a second)"):
            _convert_or_name_the_file(gguf_path, staging, hint)
        (staging / READY_MARKER).write_text(f"converted from {gguf_path.name}\n", encoding="utf-8")
        if target.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_or_name_the_file(gguf_path: Path, out_dir: Path, hint: str) -> None:
    """A truncated or foreign file fails inside the reader with numpy/struct errors: name the file instead."""
    try:
        _convert(gguf_path, out_dir)
    except Exception:
        check_gguf(gguf_path, hint)
        raise


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
