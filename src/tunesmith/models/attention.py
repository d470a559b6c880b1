"""Which attention kernel a model trains with, and whether packed rows need a block mask."""

from __future__ import annotations

import importlib.util

from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA

# Kernels that find sample boundaries from position ids (no mask needed); config name -> transformers name.
# For flex attention, transformers reads the restarting position ids and builds a block-causal BlockMask.
VARLEN_KERNELS = {
    "varlen_sdpa": VARLEN_SDPA,
    "flash_attention_2": "flash_attention_2",
    "flex_attention": "flex_attention",
}


def choose_attention(requested: str, device_type: str) -> str:
    """The transformers attention implementation for `train.attention`.

    `auto`: flash-attention varlen on a GPU where the package is installed, else per-sample causal SDPA
    (`varlen_sdpa`): both skip the cross-sample work a block-diagonal mask would still compute.
    """
    if requested == "auto":
        return "flash_attention_2" if _has_flash_attn(device_type) else VARLEN_SDPA
    if requested == "flash_attention_2" and not _has_flash_attn(device_type):
        raise ValueError("train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package")
    if requested == "flex_attention" and device_type == "cpu":
        raise ValueError(
            "train.attention: flex_attention cannot train on a CPU (torch implements its backward pass "
            "on GPUs only); use varlen_sdpa, the CPU default, which isolates packed samples the same way"
        )
    return VARLEN_KERNELS.get(requested, requested)


def _has_flash_attn(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def packed_mask_kind(attention: str) -> str:
    """How packed rows tell the kernel where samples end: `none` (varlen kernels read restarting
    position ids), `additive` (eager adds the mask to the scores) or `bool` (sdpa and the rest)."""
    if attention in VARLEN_KERNELS.values():
        return "none"
    return "additive" if attention == "eager" else "bool"
