"""Which attention kernel a model trains with, and the masks packed rows need for it."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from tunesmith.config.load import ConfigError
from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA

log = logging.getLogger(__name__)

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
        raise ConfigError("train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package")
    if requested == "flex_attention" and device_type == "cpu":
        raise ConfigError(
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


def attention_logit_softcap(config: Any) -> float | None:
    """The model's attention-logit soft-cap (Gemma 2, optional in Gemma 3), if any."""
    text = getattr(config, "text_config", None)
    return getattr(config, "attn_logit_softcapping", None) or getattr(text, "attn_logit_softcapping", None)


def attention_for_model(attention: str, config: Any) -> str:
    """`attention`, or eager where it is `sdpa` and the model soft-caps attention logits.

    transformers' sdpa cannot apply the cap (it refuses Gemma 2 outright); eager applies it, and packed
    rows get the mask eager expects from `CausalLMWithLoss` whatever mask kind the batch carries.
    """
    if attention == "sdpa" and attention_logit_softcap(config):
        log.warning("attention: sdpa cannot soft-cap attention logits (attn_logit_softcapping); using eager")
        return "eager"
    return attention


GENERATION_SAFE = ("sdpa", "eager")
"""Kernels that attend correctly under a KV cache with left-padded batches. The packed varlen kernel
does not: it slices the keys by the query's own spans, so a one-token decode step would see one key."""


def generation_attention(attention: str, config: Any) -> str:
    """The kernel to generate with while training uses `attention`: the same one where it is safe
    under a KV cache, else sdpa (eager where the model soft-caps attention logits)."""
    if attention in GENERATION_SAFE:
        return attention
    return "eager" if attention_logit_softcap(config) else "sdpa"


def layer_windows(config: Any) -> dict[str, int | None]:
    """Each attention layer type of the model and its sliding window (None: full causal).

    Models without `layer_types` (Mistral, Phi-3) slide in every layer when `sliding_window` is set,
    as transformers' own mask choice does for them.
    """
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is None:
        return {"sliding_attention" if window else "full_attention": window}
    windows: dict[str, int | None] = {}
    for kind in dict.fromkeys(types):
        if kind not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(
                f"packed rows with a block mask: layer type {kind!r} is not supported; "
                "use train.attention: varlen_sdpa or turn data.packing off"
            )
        windows[kind] = window if kind == "sliding_attention" else None
    return windows


def packed_layer_masks(
    config: Any, mask: torch.Tensor, implementation: str
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The block-diagonal causal mask of packed rows, narrowed to each layer type's sliding window.

    One mask when every layer is alike; otherwise a mapping from layer type to mask, which models with
    mixed layers (Gemma 2/3, Qwen2 with max_window_layers) take in place of building their own.
    """
    masks = {
        kind: _for_kernel(_within_window(mask, window), implementation)
        for kind, window in layer_windows(config).items()
    }
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _within_window(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Keys at most `window - 1` positions back, like transformers' sliding-window overlay."""
    length = mask.shape[-1]
    if window is None or length <= window:
        return mask
    i = torch.arange(length, device=mask.device)
    band = (i[:, None] - i[None, :]) < window
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def _for_kernel(mask: torch.Tensor, implementation: str) -> torch.Tensor:
    """Eager adds the mask to the scores, so a boolean mask becomes 0 / most-negative."""
    if implementation == "eager" and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min
        )
    return mask
