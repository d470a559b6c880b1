"""Which numeric precision a run computes in, and keeping frozen weights in it.

bf16 pays wherever the hardware runs bf16 matmuls natively: CUDA GPUs from Ampere on, CPUs with
AMX (~6x fp32) or AVX512_BF16 (~4.6x). Elsewhere bf16 on a CPU is emulated and slower, so on a
CPU `auto` decides by a measured bf16/fp32 matmul ratio (training/precision_probe.py), never by a flag.
Mixed precision here always means fp32 trainable weights and optimizer state, bf16 matmuls
under autocast, and a loss computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]


BF16_MIN_SPEEDUP = 2.0
"""bf16 matmuls must be at least this much faster than fp32 for `auto` to train in bf16 on a CPU.

A step gains less than its matmuls do (casts, norms and attention stay), so a marginal ratio would
buy rounding noise for little speed."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str
    """Why, for the run's first lines: e.g. 'auto: bf16 matmul measured 4.6x fp32 on AMD EPYC'."""


def choose_precision(requested: str, device_type: str) -> PrecisionChoice:
    """`auto` becomes bf16 on bf16-capable GPUs and on CPUs where bf16 measures clearly faster."""
    if requested != "auto":
        return PrecisionChoice(requested, "as configured")  # type: ignore[arg-type]
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto: the GPU supports bf16")
        return PrecisionChoice("fp32", "auto: the GPU has no bf16")
    if device_type == "cpu":
        from tunesmith.training.precision_probe import cpu_bf16_speedup, cpu_model_name

        speedup = cpu_bf16_speedup()
        measured = f"bf16 matmul measured {speedup:.1f}x fp32 on {cpu_model_name()}"
        if speedup >= BF16_MIN_SPEEDUP:
            return PrecisionChoice("bf16", f"auto: {measured}")
        return PrecisionChoice("fp32", f"auto: {measured}, below the {BF16_MIN_SPEEDUP:g}x that pays")
    return PrecisionChoice("fp32", f"auto: fp32 on {device_type}")


def resolve_precision(requested: str, device_type: str) -> Precision:
    """The precision alone (see `choose_precision`)."""
    return choose_precision(requested, device_type).precision


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
        if not module.weight.is_floating_point():  # a 4/8-bit base (QLoRA) stays as bitsandbytes stores it
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
