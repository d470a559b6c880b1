"""Padding-free attention on any device: each packed sample attends only to itself.

A block-diagonal mask over a packed row of length L costs L^2 attention work whatever the
samples' lengths, and forces the masked (slower) kernel. Here every sample found in the row
(position ids restart at 0) runs as its own causal SDPA call, so the work is the sum of n_i^2
and the fast causal kernel is used. Sliding windows get a banded mask per sample; a soft-capped
model (Gemma 2) gets eager-style attention per sample, since SDPA cannot cap scores. Registered
with transformers' attention interface under one name, explicitly, when a model is loaded with
it; nothing changes on import.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NAME = "tunesmith_varlen"
"""No `sdpa` in the name: transformers would then demand the model's own sdpa support (Gemma 2 has none)."""


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans where position ids count up by one from a restart."""
    restarts = torch.ones_like(position_ids, dtype=torch.bool)
    restarts[:, 1:] = torch.diff(position_ids, dim=-1) != 1
    bounds = []
    length = position_ids.shape[1]
    for row in restarts:
        starts = row.nonzero().flatten().tolist() + [length]
        bounds.append(list(zip(starts[:-1], starts[1:], strict=True)))
    return bounds


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """flash-attention's varlen arguments for packed rows, the whole batch flattened into one sequence.

    transformers finds packed samples from position ids only when a batch has one row; with more rows
    it runs plain causal attention per row, so each packed sample would attend into the samples before
    it. Given `cu_seq_lens_*`/`max_length_*` it runs the varlen kernel over the flattened batch (and
    skips re-deriving them in every layer). A sample starts at every row start and wherever the
    position ids do not count up by one."""
    restarts = torch.ones_like(position_ids, dtype=torch.bool)
    restarts[:, 1:] = torch.diff(position_ids, dim=-1) != 1
    starts = restarts.reshape(-1).nonzero().flatten()
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    cu_seq_lens = torch.cat([starts, total]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (B, H, L, D), key/value (B, H_kv, L, D) -> output (B, L, H, D), like transformers' kernels."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(
            f"{NAME}: no position_ids reached the attention kernel; it finds packed samples where they "
            "restart at 0, and without them a packed row would attend across its samples"
        )
    # Models may pass (1, L) for a whole batch.
    position_ids = position_ids.reshape(-1, query.shape[2]).expand(query.shape[0], -1)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    rows = []
    for b, spans in enumerate(segment_bounds(position_ids)):
        parts = [
            _segment_attention(
                *(t[b : b + 1, :, start:end] for t in (query, key, value)), window, softcap, dropout, scaling
            )
            for start, end in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    softcap: float | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal attention within one sample; the fast causal kernel unless a window or soft-cap needs more."""
    length = q.shape[2]
    mask = _sliding_mask(length, window, q.device) if window and length > window else None
    if softcap:
        allowed = mask if mask is not None else _sliding_mask(length, length, q.device)
        return _softcapped_attention(q, k, v, allowed, softcap, dropout, scaling)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def _softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    softcap: float,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention with scores squashed to (-softcap, softcap) by tanh before the mask, as Gemma 2 and
    transformers' eager kernel do; SDPA has no hook for it, so the scores are materialised."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)


def _sliding_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Sample boundaries come from position ids, so transformers need not build any mask."""
    return None


def register_varlen_sdpa() -> str:
    """Make `attn_implementation=NAME` loadable; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_sdpa_forward)
        AttentionMaskInterface.register(NAME, _no_mask)
        log.info("registered attention implementation %s", NAME)
    return NAME
