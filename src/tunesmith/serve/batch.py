"""The decode batch: sequences of different lengths stepped together through one forward.

Layout: one `DynamicCache` whose rows are left-padded to a common length L, so every row's newest
token sits in the last column and a decode step appends one column for all rows at once. Each row
carries its own attention-mask row (zeros over its padding) and its own position id (its real
length), so a row computes exactly what it would compute alone: padded keys get zero attention
weight and rotary positions ignore the padding.

Padding is never run through the model: a sequence is prefilled alone (no padding at all) and its
cache is padded with zeros only when it joins. That keeps padded *queries* out of every forward,
which is where fully masked softmax rows (NaN) would otherwise appear. Copies happen only when a
sequence joins or leaves, never per step beyond what `DynamicCache` itself does.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Row(Protocol):
    """What the batch needs to know about a sequence."""

    next_input: int  # the token to feed at the next step (the last one sampled)
    length: int  # tokens already in the cache for this row (its next position id)


class DecodeBatch:
    """Rows decoded together; the engine adds prefilled rows and drops finished ones between steps."""

    def __init__(self, device: torch.device, cache_arg: str = "cache") -> None:
        self.device = device
        self.cache_arg = cache_arg
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, L], 1 where the row has a real token

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, cache: Any) -> None:
        """Join a row whose prompt was prefilled alone into `cache` (batch 1, `row.length` columns)."""
        own = torch.ones(1, row.length, dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, own
            return
        assert self.mask is not None
        width = max(self.mask.shape[1], row.length)
        batch_pad, row_pad = width - self.mask.shape[1], width - row.length
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            if not _filled(mine):
                continue
            mine.keys = torch.cat([_left_pad(mine.keys, batch_pad), _left_pad(theirs.keys, row_pad)], dim=0)
            mine.values = torch.cat(
                [_left_pad(mine.values, batch_pad), _left_pad(theirs.values, row_pad)], dim=0
            )
        self.mask = torch.cat([F.pad(self.mask, (batch_pad, 0)), F.pad(own, (row_pad, 0))], dim=0)
        self.rows.append(row)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), then drop leading columns that are padding in every row."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        self.rows = [self.rows[i] for i in indices]
        index = torch.tensor(indices, device=self.device)
        mask = self.mask.index_select(0, index)
        unused = int((mask.shape[1] - mask.sum(dim=1)).min())
        self.mask = mask[:, unused:]
        for layer in _layers(self.cache):
            if _filled(layer):
                layer.keys = layer.keys.index_select(0, index)[:, :, unused:]
                layer.values = layer.values.index_select(0, index)[:, :, unused:]

    @torch.no_grad()
    def step(self, model: Any, **forward_kwargs: Any) -> torch.Tensor:
        """One decode forward over all rows; returns fp32 logits `[B, vocab]` and advances each row."""
        assert self.mask is not None
        input_ids = torch.tensor([[row.next_input] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_arg: self.cache},
            **forward_kwargs,
        )
        self.cache = returned_cache(out)
        for row in self.rows:
            row.length += 1
        return out.logits[:, -1, :].float()


@torch.no_grad()
def prefill(
    model: Any, prompt: list[int], device: torch.device, cache_arg: str = "cache", **forward_kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """Run one prompt alone (no padding); returns its cache and fp32 logits for the next token `[vocab]`."""
    from transformers import DynamicCache

    input_ids = torch.tensor([prompt], device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: DynamicCache()},
        **forward_kwargs,
    )
    return returned_cache(out), out.logits[0, -1, :].float()


def cache_argument(model: Any) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.24, where `past_key_values` is
    deprecated) or `past_key_values` (earlier 5.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _layers(cache: Any) -> list[Any]:
    """The per-layer stores of a transformers `DynamicCache`: the only place its internals are touched."""
    return list(cache.layers)


def _filled(layer: Any) -> bool:
    return getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel() > 0


def _left_pad(states: torch.Tensor, columns: int) -> torch.Tensor:
    """Zeros before the first cached position of `[B, heads, L, dim]` states."""
    return F.pad(states, (0, 0, columns, 0)) if columns else states
