"""Padding-free packing: several samples share one row, and attention never crosses them.

On CPU (sdpa/eager) position ids that restart per sample do NOT isolate samples in
transformers, so packed rows carry a 4-D block-diagonal causal mask; the position ids
restart at each sample so that rotary embeddings see the same positions as unpacked.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of at most `capacity` tokens (first-fit decreasing).

    Uses a sorted list of remaining capacities, so each placement is a binary search: O(n log n).
    Bins are returned in order of creation; indices inside a bin in placement order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for index in order:
        need = lengths[index]
        if need > capacity:
            raise ValueError(f"sample of {need} tokens exceeds the row capacity {capacity}")
        slot = bisect.bisect_left(free, (need, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - need, len(bins) - 1))
            continue
        remaining, bin_id = free.pop(slot)
        bins[bin_id].append(index)
        bisect.insort(free, (remaining - need, bin_id))
    return bins


def packing_fill(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the packed rows' token slots holding real tokens."""
    return sum(lengths) / (len(bins) * capacity) if bins else 0.0


def collate_packed(
    rows: Sequence[Sequence[TokenizedSample]], pad_id: int, block_mask: str = "bool"
) -> dict[str, torch.Tensor]:
    """Each row is a list of samples laid end to end; rows are right-padded to the longest row.

    `block_mask`: "bool" (True = attend, for sdpa), "additive" (0 / -inf scores, for eager), or "none"
    for varlen kernels, which find sample boundaries where the position ids restart.
    """
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.zeros((batch, width), dtype=torch.long)  # 0 = padding, k = k-th sample of the row
    for r, row in enumerate(rows):
        offset = 0
        for k, sample in enumerate(row, start=1):
            n = len(sample.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(sample.input_ids)
            labels[r, offset : offset + n] = torch.tensor(sample.labels)
            labels[r, offset] = (
                IGNORE_INDEX  # a sample's first token is never predicted from the previous one
            )
            position_ids[r, offset : offset + n] = torch.arange(n)
            segment[r, offset : offset + n] = k
            offset += n
    if block_mask == "none":
        for r in range(batch):  # the padding tail counts up as one more segment, not one per token
            used = int((segment[r] > 0).sum())
            position_ids[r, used:] = torch.arange(width - used)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    same_sample = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = same_sample & causal & (segment[:, :, None] > 0)
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself only: no empty softmax rows
    mask = mask[:, None, :, :]
    if block_mask == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(
            ~mask, torch.finfo(torch.float32).min
        )
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def collate_padded(samples: Sequence[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest in the batch."""
    width = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for r, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[r, :n] = torch.tensor(sample.input_ids)
        labels[r, :n] = torch.tensor(sample.labels)
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
