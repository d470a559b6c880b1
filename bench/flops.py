"""The machine's fp32 matmul ceiling and the training FLOPs a workload needs (for an MFU-style figure).

Useful FLOPs are what the workload *requires*, the same number for every tool; work a tool adds on
its own (logits at padded or unlabelled positions, attention across padding) is not counted, so a
tool that does such work shows a lower utilisation. For a decoder with linear weights N_lin (all
q/k/v/o/gate/up/down projections), hidden d, vocabulary V, layers L, heads x head_dim = A:

- per real token, decoder linears: full 6 * N_lin (forward 2, grad-input 2, grad-weight 2);
  LoRA 4 * N_lin (frozen base: forward + grad-input) + 6 * N_lora (the adapters themselves)
- per trained (labelled) token, LM head: full 6 * V * d; LoRA 4 * V * d (the head is frozen)
- attention scores, per sample of n tokens (causal: n(n+1)/2 query-key pairs), per layer:
  forward 4 * A per pair (QK^T and PV), backward twice that: 12 * A * n(n+1)/2 * L in all
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


def matmul_peak_flops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Median FLOP/s of `size x size` matmuls (after warm-up), with the threads torch uses by default."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


@dataclass
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            config.vocab_size,
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear in one decoder layer."""
        d, q, kv, ff = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]

    @property
    def n_linear(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears())

    def n_lora(self, r: int) -> int:
        return self.layers * sum(r * (i + o) for i, o in self.linears())


def useful_flops(
    shape: ModelShape, lengths: Sequence[int], trained: Sequence[int], workload: str, lora_r: int = 16
) -> dict[str, float]:
    """FLOPs one epoch over these samples requires (see the module docstring), by part."""
    real, labelled = sum(lengths), sum(trained)
    attn_dim = shape.heads * shape.head_dim
    head = shape.vocab * shape.hidden
    if workload == "full":
        linear = 6 * shape.n_linear * real
        lm_head = 6 * head * labelled
    else:
        linear = (4 * shape.n_linear + 6 * shape.n_lora(lora_r)) * real
        lm_head = 4 * head * labelled
    attention = 12 * attn_dim * shape.layers * sum(n * (n + 1) / 2 for n in lengths)
    total = linear + lm_head + attention
    return {
        "linear": linear,
        "lm_head": lm_head,
        "attention": attention,
        "total": total,
        "per_real_token": total / max(real, 1),
    }


def describe(shape: ModelShape, lora_r: int) -> dict[str, Any]:
    return {
        **asdict(shape),
        "n_linear": shape.n_linear,
        "n_lora": shape.n_lora(lora_r),
        "n_head": shape.vocab * shape.hidden,
    }
