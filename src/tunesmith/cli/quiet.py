"""Keep library noise (progress bars, deprecation warnings) off the terminal unless --verbose.

Users should see only tunesmith's own progress and messages; the libraries underneath print
download and weight-loading bars and warnings about their own internal deprecations, which the
user cannot act on. This is applied once by the CLI at start-up, never on import.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_PACKAGES = (
    "transformers",
    "peft",
    "accelerate",
    "torch",
    "huggingface_hub",
    "datasets",
    "gguf",
    "bitsandbytes",  # on import, on CPUs with AVX512-BF16: "Failed to load CPU gemm_4bit_forward ..."
    "kernels",
)


def quiet_libraries(verbose: bool) -> None:
    """Silence third-party bars, info logs and warnings; with verbose, leave them all on."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF reader draws its own bar
    for name in NOISY_PACKAGES:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers keeps its own verbosity and tqdm switch apart from logging and warnings."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
