"""Tokenized samples as a few flat arrays: what worker processes send back and the cache stores.

A list of `TokenizedSample` holds one Python int object per token, which is slow to pickle and
cannot be written without pickle. Here all samples share one int32 array of ids, one uint8 array
saying which tokens are trained (a label is always either -100 or the token itself), and
offsets; where each sample came from is a table of (file, unit) plus a line per sample.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data.conversation import RowRef
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample


@dataclass
class TokenBlock:
    ids: np.ndarray  # int32, every sample's input ids end to end
    trained: np.ndarray  # uint8, 1 where the label is the token itself
    offsets: np.ndarray  # int64, len = samples + 1
    truncated: np.ndarray  # uint8, per sample
    file_index: np.ndarray  # int32, per sample: index into `files`
    lines: np.ndarray  # int64, per sample
    files: list[tuple[str, str]] = field(default_factory=list)  # (file, unit) of RowRef

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_samples(cls, samples: Sequence[TokenizedSample]) -> TokenBlock:
        files: dict[tuple[str, str], int] = {}
        lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids: list[int] = []
        labels: list[int] = []
        for sample in samples:
            ids.extend(sample.input_ids)
            labels.extend(sample.labels)
        ids_array = np.asarray(ids, dtype=np.int32)
        labels_array = np.asarray(labels, dtype=np.int64)
        trained = labels_array != IGNORE_INDEX
        if not np.array_equal(labels_array[trained], ids_array[trained]):
            raise ValueError("a label differs from its token: TokenBlock stores labels as a mask")
        file_index = [files.setdefault((s.source.file, s.source.unit), len(files)) for s in samples]
        return cls(
            ids=ids_array,
            trained=trained.astype(np.uint8),
            offsets=offsets,
            truncated=np.asarray([s.truncated for s in samples], dtype=np.uint8),
            file_index=np.asarray(file_index, dtype=np.int32),
            lines=np.asarray([s.source.line for s in samples], dtype=np.int64),
            files=list(files),
        )

    def to_samples(self) -> list[TokenizedSample]:
        """The samples as lists; the garbage collector is paused meanwhile, because the millions
        of new int objects would trigger full collections that find nothing (half the time)."""
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._to_samples()
        finally:
            if paused:
                gc.enable()

    def _to_samples(self) -> list[TokenizedSample]:
        ids = self.ids.tolist()
        labels = np.where(self.trained.astype(bool), self.ids, IGNORE_INDEX).tolist()
        refs = [RowRef(file, 0, unit) for file, unit in self.files]
        bounds = self.offsets.tolist()
        return [
            TokenizedSample(
                ids[bounds[k] : bounds[k + 1]],
                labels[bounds[k] : bounds[k + 1]],
                RowRef(refs[f].file, line, refs[f].unit),
                bool(cut),
            )
            for k, (f, line, cut) in enumerate(
                zip(self.file_index.tolist(), self.lines.tolist(), self.truncated.tolist(), strict=True)
            )
        ]


def concat(blocks: Sequence[TokenBlock]) -> TokenBlock:
    """Blocks end to end, in order (the result of chunks tokenized in parallel)."""
    files: dict[tuple[str, str], int] = {}
    ids, trained, lengths, truncated, file_index, lines = [], [], [], [], [], []
    for block in blocks:
        remap = np.asarray([files.setdefault(f, len(files)) for f in block.files] or [0], dtype=np.int32)
        ids.append(block.ids)
        trained.append(block.trained)
        lengths.append(np.diff(block.offsets))
        truncated.append(block.truncated)
        file_index.append(remap[block.file_index])
        lines.append(block.lines)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    return TokenBlock(
        ids=_cat(ids, np.int32),
        trained=_cat(trained, np.uint8),
        offsets=offsets,
        truncated=_cat(truncated, np.uint8),
        file_index=_cat(file_index, np.int32),
        lines=_cat(lines, np.int64),
        files=list(files),
    )


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
