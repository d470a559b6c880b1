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

import torch

from tunesmith.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing, packing_fill
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    sources: list[str]
    trained_tokens: int
    real_tokens: int


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
    ) -> None:
        self.samples = samples
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
        if not self.shuffle:
            return list(range(len(self.units)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.units), generator=generator).tolist()

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        order = self._order(epoch)
        chosen = [self.units[u] for u in order[position * self.batch_size : (position + 1) * self.batch_size]]
        rows = [[self.samples[i] for i in unit] for unit in chosen]
        if self.packing:
            tensors = collate_packed(rows, self.pad_id)
        else:
            tensors = collate_padded([row[0] for row in rows], self.pad_id)
        flat = [sample for row in rows for sample in row]
        return MicroBatch(
            tensors=tensors,
            sources=[str(s.source) for s in flat],
            trained_tokens=int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum()),
            real_tokens=sum(len(s.input_ids) for s in flat),
        )

    def __len__(self) -> int:
        return self.per_epoch
