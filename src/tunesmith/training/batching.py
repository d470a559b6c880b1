"""A resumable stream of micro-batches over several epochs.

Training is a flat stream of micro-batches: micro-batch k belongs to epoch k // per_epoch, and
each epoch visits the units (packed rows, or single samples) in a permutation seeded by
(seed, epoch). Position k alone therefore determines every batch, which is what makes resume
exact: a checkpoint only needs to remember k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing, packing_fill
from tunesmith.data.streaming import StreamingRows
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    sources: list[str]
    trained_tokens: int
    real_tokens: int
    units: int
    """What the method's loss is summed over (see methods/base.py); for next-token methods, trained tokens."""


def collate_rows(
    rows: list[list[TokenizedSample]], pad_id: int, packing: bool, block_mask: str = "bool"
) -> MicroBatch:
    if packing:
        tensors = collate_packed(rows, pad_id, block_mask)
    else:
        tensors = collate_padded([row[0] for row in rows], pad_id)
    flat = [sample for row in rows for sample in row]
    trained = int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
    return MicroBatch(
        tensors=tensors,
        sources=[str(s.source) for s in flat],
        trained_tokens=trained,
        real_tokens=sum(len(s.input_ids) for s in flat),
        units=trained,
    )


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order an epoch visits `count` units in: a permutation seeded by (seed, epoch) alone."""
    if not shuffle:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


class BatchStream:
    def __init__(
        self,
        samples: Sequence[TokenizedSample],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        block_mask: str = "bool",
    ) -> None:
        self.samples = samples
        self.block_mask = block_mask
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.seed = seed
        self.shuffle = shuffle
        lengths = [len(s.input_ids) for s in samples]
        self.units: list[list[int]] = (
            pack_first_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(samples))]
        )
        self.fill = packing_fill(lengths, self.units, seq_len) if packing else None
        self.per_epoch = math.ceil(len(self.units) / batch_size)

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.units), self.seed, epoch, self.shuffle)

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        order = self._order(epoch)
        chosen = [self.units[u] for u in order[position * self.batch_size : (position + 1) * self.batch_size]]
        rows = [[self.samples[i] for i in unit] for unit in chosen]
        return collate_rows(rows, self.pad_id, self.packing, self.block_mask)

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {}  # the micro-batch index alone determines every batch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class StreamingBatchStream:
    """Micro-batches drawn in order from a StreamingRows; random access is not possible, so indices
    must only grow (skipped indices, e.g. other ranks' batches, are drawn and discarded)."""

    per_epoch = None
    fill = None

    def __init__(
        self, rows: StreamingRows, batch_size: int, pad_id: int, packing: bool, block_mask: str = "bool"
    ) -> None:
        self.rows, self.batch_size, self.pad_id, self.packing = rows, batch_size, pad_id, packing
        self.block_mask = block_mask
        self.next_index = 0

    def micro_batch(self, index: int) -> MicroBatch:
        if index < self.next_index:
            raise RuntimeError(
                f"streaming data cannot go back (asked for micro-batch {index}, at {self.next_index})"
            )
        while self.next_index < index:
            for _ in range(self.batch_size):
                self.rows.next_row()
            self.next_index += 1
        batch = [self.rows.next_row() for _ in range(self.batch_size)]
        self.next_index += 1
        return collate_rows(batch, self.pad_id, self.packing, self.block_mask)

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index, "rows": self.rows.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self.next_index = state["next_index"]
