"""Show tokenized samples the way the model sees them, with the trained tokens marked.

Masking bugs are silent (the loss still goes down), so the trained part must be visible: in a
terminal it is coloured, elsewhere (pipes, logs, tests) it is wrapped in `[[...]]`. Text is decoded
run by run (a run is a stretch of tokens that are all trained or all not), with special tokens
kept, so an end-of-turn token shows inside the trained run it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunesmith.data.build import BuiltData
from tunesmith.data.packing import pack_first_fit_decreasing, packing_fill
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample

OPEN, CLOSE = "[[", "]]"
TRAINED_STYLE = "bold green"
PROMPT_STYLE = "dim"
SHOWN_PROBLEMS = 10


def label_runs(sample: TokenizedSample) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained: [(trained, ids), ...]."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def marked_text(tokenizer: Any, sample: TokenizedSample) -> str:
    """The sample's text with every trained run wrapped in `[[` `]]`."""
    return "".join(
        f"{OPEN}{decode(tokenizer, ids)}{CLOSE}" if trained else decode(tokenizer, ids)
        for trained, ids in label_runs(sample)
    )


def rich_text(tokenizer: Any, sample: TokenizedSample) -> Any:
    """The sample as a `rich.text.Text`: trained runs bold green, the prompt dim."""
    from rich.text import Text

    text = Text()
    for trained, ids in label_runs(sample):
        text.append(decode(tokenizer, ids), style=TRAINED_STYLE if trained else PROMPT_STYLE)
    return text


def sample_header(sample: TokenizedSample, index: int, total: int) -> str:
    cut = ", truncated" if sample.truncated else ""
    return (
        f"sample {index + 1} of {total} ({sample.source}, {len(sample.input_ids)} tokens, "
        f"{sample.num_trained} trained{cut})"
    )


def sample_record(tokenizer: Any, sample: TokenizedSample) -> dict[str, Any]:
    """One sample as JSON-ready data: ids, labels (-100 = not trained), text and where it came from."""
    return {
        "source": str(sample.source),
        "input_ids": list(sample.input_ids),
        "labels": list(sample.labels),
        "text": decode(tokenizer, sample.input_ids),
        "truncated": sample.truncated,
    }


def summary_lines(built: BuiltData, seq_len: int, packing: bool) -> list[str]:
    """The counts a user checks before training: samples, tokens, losses, packing fill, per source."""
    report = built.report
    lines = [
        f"samples: {report.train_samples} train, {report.eval_samples} eval",
        f"tokens: {report.train_tokens} train ({report.trained_tokens} trained)",
        f"truncated: {report.truncated}  skipped: {len(report.skipped)}  dropped: {len(report.dropped)}"
        f"  duplicates: {report.duplicates}",
    ]
    if packing and built.train:
        lengths = [len(s.input_ids) for s in built.train]
        bins = pack_first_fit_decreasing(lengths, seq_len)
        report.packing_fill = packing_fill(lengths, bins, seq_len)
        rows = f"{len(bins)} row{'s' if len(bins) != 1 else ''}"
        lines.append(f"packing fill: {report.packing_fill:.1%} ({rows} of {seq_len} tokens)")
    else:
        lines.append("packing: off")
    lines.append("sources:")
    lines += [f"  {source.line()}" for source in report.sources]
    problems = report.skipped + report.dropped
    if problems:
        lines.append("skipped and dropped rows:")
        lines += [f"  {issue}" for issue in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    return lines
