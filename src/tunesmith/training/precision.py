"""Which numeric precision a run computes in, and keeping frozen weights in it.

bf16 pays wherever the hardware has bf16 matrix units: CUDA GPUs from Ampere on, and CPUs with
AMX (Intel Xeon from Sapphire Rapids on), where a bf16 matmul runs 7-10x faster than fp32 (see
docs/benchmarks.md). Elsewhere bf16 on a CPU is emulated and slower, so `auto` keeps fp32 there.
Mixed precision here always means fp32 trainable weights and optimizer state, bf16 matmuls
under autocast, and a loss computed in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]


def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX tiles (bf16 matrix units); torch's own probe, absent in old builds."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_precision(requested: str, device_type: str) -> Precision:
    """`auto` becomes bf16 on bf16-capable GPUs and AMX CPUs, fp32 otherwise; others pass through."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device_type == "cpu":
        return "bf16" if cpu_has_amx_bf16() else "fp32"
    return "fp32"


def accelerate_mixed_precision(precision: Precision) -> str:
    """accelerate's name for it: 'no', 'bf16' or 'fp16'."""
    return "no" if precision == "fp32" else precision


def allow_new_mixed_precision(mixed_precision: str) -> None:
    """Let a second run in the same process use another precision.

    accelerate keeps the mixed-precision setting in a process-wide singleton and refuses a new
    one, so a notebook that ran an fp32 job could not run a bf16 one. Only the accelerator part is
    reset; the distributed (process-group) state is kept.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and str(shared.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def store_frozen_linear_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep frozen Linear weights (LoRA's base layers) in `dtype`; returns how many were cast.

    Under autocast these weights would otherwise be cast from fp32 at every forward, which costs
    time and a second copy in memory. Trainable parameters, embeddings (and a head tied to them)
    and norms stay fp32, so the residual stream and the optimizer keep full precision. Only for
    runs that save the adapter alone: the base weights are never written back.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embedding.weight)} if embedding is not None else set()
    cast = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.requires_grad:
            continue
        if id(module.weight) in tied:
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        cast += 1
    return cast


def restore_fp32(model: nn.Module) -> None:
    """Back to fp32 everywhere, so the in-process model runs without autocast (values stay bf16-rounded)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
