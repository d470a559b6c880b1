"""Streaming: train on JSON Lines files larger than memory, with exact resume.

Rows are read in blocks of `block_rows` lines; each block is validated, tokenized, packed
(first-fit decreasing) and shuffled with a seed derived from the block number. Memory is bounded
by one block. A position is (file, byte offset, line) of the block start plus how many packed
rows of the block were already used, so resume re-reads one block and skips what was done.
At the end of the last file the stream starts another pass (training length is `max_steps`).

Rows rejected on the first pass (unreadable, invalid, or failing to render or tokenize) are
reported as the in-memory path reports them: each `file:line: reason` goes to the data report
and the log, and the run stops once the rejected fraction of the rows read so far exceeds
`data.max_dropped_fraction`. Later passes meet the same rows again and stay quiet about them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.batch_tokenize import TokenizeResult
from tunesmith.data.build import DataReport, check_loss_budget
from tunesmith.data.conversation import RowRef, Sample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import RowError, detect_format, to_sample
from tunesmith.data.packing import pack_first_fit_decreasing
from tunesmith.data.sources import parse_json_line
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.data.validate import BadRowError

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[Sample], int], TokenizeResult]  # (samples, file index) -> tokenized


@dataclass
class StreamPosition:
    file_index: int = 0
    offset: int = 0  # byte offset of the block's first line
    line: int = 1  # its 1-based line number
    block: int = 0  # blocks started so far (seeds the shuffle)
    rows_done: int = 0  # packed rows of this block already handed out
    passes: int = 0  # complete passes over all files before this block


@dataclass
class StreamStats:
    rows_read: int = 0
    skipped: int = 0
    blocks: int = 0


@dataclass
class _Block:
    """One block as read: its samples, the rows it rejected, and where the next block starts."""

    samples: list[Sample]
    issues: list[RowIssue]
    rows_read: int
    following: StreamPosition
    dropped: list[RowIssue] = field(default_factory=list)


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
        report: DataReport | None = None,
        max_dropped_fraction: float = 1.0,
    ) -> None:
        for path, _ in files:
            if path.suffix.lower() not in (".jsonl", ".ndjson"):
                raise DataError(f"data.streaming reads JSON Lines files only; {path} is not (.jsonl)")
        self.files, self.tokenize, self.seq_len, self.packing = list(files), tokenize, seq_len, packing
        self.block_rows, self.seed, self.on_error = block_rows, seed, on_error
        self.report = report if report is not None else DataReport()
        self.max_dropped_fraction = max_dropped_fraction
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
        block = self._read_block(self.position)
        self._next_start = block.following
        result = self.tokenize(block.samples, self.position.file_index)
        if result.failed and self.on_error == "raise":
            raise BadRowError(result.failed[0])
        tokenized = result.block.to_samples()
        if self.position.passes == 0:
            self._account(block, result)
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

    def _account(self, block: _Block, result: TokenizeResult) -> None:
        """Report a first-pass block's rejected rows and stop when too many rows are lost."""
        skipped = sorted(block.issues + result.failed, key=lambda i: i.ref.line)
        report = self.report
        report.rows_read += block.rows_read
        report.truncated += result.truncated
        report.skipped.extend(skipped)
        report.dropped.extend(result.dropped)
        self.stats.skipped += len(skipped)
        for issue in skipped:
            log.warning("skipped %s", issue)
        for issue in result.dropped:
            log.warning("dropped %s", issue)
        check_loss_budget(report, self.max_dropped_fraction, "streamed so far ")

    def _read_block(self, start: StreamPosition) -> _Block:
        path, fmt = self.files[start.file_index]
        samples: list[Sample] = []
        issues: list[RowIssue] = []
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
                if isinstance(sample, RowIssue):
                    issues.append(sample)
                else:
                    samples.append(sample)
            at_end = not handle.readline()
        self.stats.rows_read += read
        return _Block(samples, issues, read, self._following(start, offset, line, at_end))

    def _following(self, start: StreamPosition, offset: int, line: int, at_end: bool) -> StreamPosition:
        if not at_end:
            return StreamPosition(start.file_index, offset, line, start.block + 1, 0, start.passes)
        following = (start.file_index + 1) % len(self.files)
        passes = start.passes + (following == 0)
        return StreamPosition(following, 0, 1, start.block + 1, 0, passes)

    def _to_sample(self, raw: bytes, ref: RowRef, fmt: str) -> Sample | RowIssue:
        row = parse_json_line(raw, ref)
        issue: RowIssue | None = row if isinstance(row, RowIssue) else None
        if issue is None:
            assert isinstance(row, dict)
            detected = fmt if fmt != "auto" else detect_format(row)
            try:
                if detected is None:
                    keys = ", ".join(repr(k) for k in sorted(row)) or "none"  # repr: keys may hold anything
                    raise RowError(f"cannot detect the format (keys: {keys})")
                return to_sample(row, detected, ref)
            except RowError as exc:
                issue = RowIssue(ref, exc.reason)
        if self.on_error == "raise":
            raise BadRowError(issue)
        return issue
