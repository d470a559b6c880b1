"""Streaming: train on JSON Lines files larger than memory, with exact resume.

Rows are read in blocks of `block_rows` lines; each block is validated, tokenized, packed
(first-fit decreasing) and shuffled with a seed derived from the block number. Memory is bounded
by one block. A position is (file, byte offset, line) of the block start plus how many packed
rows of the block were already used, so resume re-reads one block and skips what was done.
At the end of the last file the stream starts another pass (training length is `max_steps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.conversation import RowRef, Sample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import RowError, detect_format, to_sample
from tunesmith.data.packing import pack_first_fit_decreasing
from tunesmith.data.sources import parse_json_line
from tunesmith.data.tokenize import TokenizedSample

Tokenizer = Callable[[list[Sample], int], list[TokenizedSample]]  # (samples, file index) -> tokenized


@dataclass
class StreamPosition:
    file_index: int = 0
    offset: int = 0  # byte offset of the block's first line
    line: int = 1  # its 1-based line number
    block: int = 0  # blocks started so far (seeds the shuffle)
    rows_done: int = 0  # packed rows of this block already handed out


@dataclass
class StreamStats:
    rows_read: int = 0
    skipped: int = 0
    blocks: int = 0


class StreamingRows:
    """An endless, resumable sequence of packed rows (lists of samples) from JSON Lines files."""

    def __init__(
        self,
        files: Sequence[tuple[Path, str]],
        tokenize: Tokenizer,
        seq_len: int,
        packing: bool,
        block_rows: int,
        seed: int,
        on_error: str,
    ) -> None:
        for path, _ in files:
            if path.suffix.lower() not in (".jsonl", ".ndjson"):
                raise DataError(f"data.streaming reads JSON Lines files only; {path} is not (.jsonl)")
        self.files, self.tokenize, self.seq_len, self.packing = list(files), tokenize, seq_len, packing
        self.block_rows, self.seed, self.on_error = block_rows, seed, on_error
        self.stats = StreamStats()
        self.position = StreamPosition()
        self._rows: list[list[TokenizedSample]] = []
        self._next_start: StreamPosition | None = None
        self._rows_this_pass = 0
        self._load_block()

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = state["rows_done"]
        self.position = StreamPosition(**{**state, "rows_done": 0})
        self._load_block()
        self.position.rows_done = done

    def next_row(self) -> list[TokenizedSample]:
        while self.position.rows_done >= len(self._rows):
            assert self._next_start is not None
            if (
                self._next_start.file_index == 0 and self._next_start.offset == 0
            ):  # a pass over all files ends
                if self._rows_this_pass == 0:
                    raise DataError("data.streaming: a whole pass over the files gave no usable rows")
                self._rows_this_pass = 0
            self.position = self._next_start
            self._load_block()
        row = self._rows[self.position.rows_done]
        self.position.rows_done += 1
        return row

    def _load_block(self) -> None:
        samples, self._next_start = self._read_block(self.position)
        tokenized = self.tokenize(samples, self.position.file_index)
        lengths = [len(s.input_ids) for s in tokenized]
        units = (
            pack_first_fit_decreasing(lengths, self.seq_len)
            if self.packing
            else [[i] for i in range(len(tokenized))]
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position.block)
        order = torch.randperm(len(units), generator=generator).tolist()
        self._rows = [[tokenized[i] for i in units[u]] for u in order]
        self._rows_this_pass += len(self._rows)
        self.stats.blocks += 1

    def _read_block(self, start: StreamPosition) -> tuple[list[Sample], StreamPosition]:
        path, fmt = self.files[start.file_index]
        samples: list[Sample] = []
        with path.open("rb") as handle:
            handle.seek(start.offset)
            line, offset, read = start.line, start.offset, 0
            while read < self.block_rows:
                raw = handle.readline()
                if not raw:
                    break
                offset += len(raw)
                ref = RowRef(str(path), line)
                line += 1
                if not raw.strip():
                    continue
                read += 1
                sample = self._to_sample(raw, ref, fmt)
                if sample is not None:
                    samples.append(sample)
            at_end = not handle.readline()
        self.stats.rows_read += read
        if at_end:
            following = (start.file_index + 1) % len(self.files)
            nxt = StreamPosition(following, 0, 1, start.block + 1, 0)
        else:
            nxt = StreamPosition(start.file_index, offset, line, start.block + 1, 0)
        return samples, nxt

    def _to_sample(self, raw: bytes, ref: RowRef, fmt: str) -> Sample | None:
        row = parse_json_line(raw, ref)
        issue: RowIssue | None = row if isinstance(row, RowIssue) else None
        if issue is None:
            assert isinstance(row, dict)
            detected = fmt if fmt != "auto" else detect_format(row)
            try:
                if detected is None:
                    raise RowError(f"cannot detect the format (keys: {', '.join(sorted(row)) or 'none'})")
                return to_sample(row, detected, ref)
            except RowError as exc:
                issue = RowIssue(ref, exc.reason)
        if self.on_error == "raise":
            raise DataError(f"{issue}\nhint: set data.on_error: skip to skip bad rows")
        self.stats.skipped += 1
        return None
