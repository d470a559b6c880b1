"""Which attention kernel to load a model with, and whether packed rows need a block mask."""

from __future__ import annotations

import importlib.util

VARLEN_KERNELS = ("flash_attention_2",)


def choose_attention(requested: str, device_type: str) -> str:
    """`auto` picks flash-attention (varlen: packed samples isolated by position ids) on a GPU where
    the package is installed, else PyTorch SDPA (packed samples isolated by a block-diagonal mask)."""
    if requested != "auto":
        if requested == "flash_attention_2" and not _has_flash_attn(device_type):
            raise ValueError("train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package")
        return requested
    return "flash_attention_2" if _has_flash_attn(device_type) else "sdpa"


def _has_flash_attn(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def needs_block_mask(attention: str) -> bool:
    """Varlen kernels read sample boundaries from position ids; the others need an explicit 4-D mask."""
    return attention not in VARLEN_KERNELS
