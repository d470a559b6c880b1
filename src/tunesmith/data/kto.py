"""Config -> tokenized KTO examples (method: kto), with the same report and rules as SFT and pairs.

Per source: read and validate its rows (`read_kto_samples`: `format: kto`, or `auto`, which
checks that the file holds KTO rows and refuses pairs, chat or text files as a whole), tokenize
them with its template. Bad rows follow `data.on_error` (the first stops the run, or each is
skipped and listed with file:line), rows whose completion does not fit `data.seq_len` are dropped
and listed, and `data.max_dropped_fraction` aborts a run that loses too much. Then, over all
training sources: `data.dedup`, the eval split and the shuffle (`data.seed`), as for SFT.
Sources are concatenated, each row once: mixture weights, `samples` and streaming are refused.

For `tunesmith data check` / `preview`: `read_kto_samples` returns the `SourceResult` that
`validate.read_samples` returns for other methods, and `kto_summary_lines`, `kto_header`,
`marked_kto`, `rich_kto` and `kto_record` show built examples as the pair preview does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data.build import (
    BuiltData,
    DataReport,
    SourceReport,
    check_loss_budget,
    source_template,
)
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import DEFAULT_MAX_CHARS, RowError
from tunesmith.data.kto_formats import KTO_FORMAT, KTO_KEYS, KTOSample, is_kto_row, other_kind, to_kto
from tunesmith.data.kto_tokenize import TokenizedKTO, tokenize_kto_rows
from tunesmith.data.pooling import pool_and_split, refuse_mixtures
from tunesmith.data.preference_preview import marked_parts, rich_parts
from tunesmith.data.preview import SHOWN_PROBLEMS, decode
from tunesmith.data.sources import RowResult, iter_file_rows, resolve_files
from tunesmith.data.validate import BadRowError, OnError, SourceResult

BALANCE_RANGE = (1.0, 4 / 3)
"""KTO paper, Eq. 8: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in here."""


# --- reading ------------------------------------------------------------------------------------


def read_kto_samples(
    path: str,
    fmt: str = "auto",
    on_error: OnError = "raise",
    label: str = "data.train[0]",
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> SourceResult:
    """Read and validate every KTO row a path names; bad rows raise (`on_error="raise"`) or are listed."""
    if fmt not in ("auto", KTO_FORMAT):
        raise DataError(
            f"{label}.format: method kto reads KTO rows ({KTO_KEYS}), not format {fmt!r}; "
            f"set {label}.format: kto (or auto)"
        )
    result = SourceResult()
    for file in resolve_files(path, label):
        rows = iter_file_rows(file, label)
        if fmt == "auto":
            rows = _checked_kind(rows, file, label)
        result.formats[str(file)] = KTO_FORMAT
        for ref, row in rows:
            result.rows_read += 1
            item = row if isinstance(row, RowIssue) else _convert(row, ref, max_chars)
            if isinstance(item, RowIssue):
                if on_error == "raise":
                    raise BadRowError(item)
                result.issues.append(item)
                continue
            result.samples.append(item)
    return result


def _convert(row: dict[str, Any], ref: RowRef, max_chars: int) -> KTOSample | RowIssue:
    try:
        return to_kto(row, ref, max_chars=max_chars)
    except RowError as e:
        return RowIssue(ref, e.reason)


def _checked_kind(rows: Iterator[RowResult], path: Path, label: str) -> Iterator[RowResult]:
    """All rows again, once the first row with known keys shows the file holds KTO rows.

    Rows before it are held back, not judged: they match no layout, so the KTO reader rejects them
    with a precise reason. A file of another kind (pairs, chat, text) is refused as a whole, with
    one message saying what it holds, rather than row by row.
    """
    held: list[RowResult] = []
    first: tuple[RowRef, list[str]] | None = None
    for ref, row in rows:
        held.append((ref, row))
        if isinstance(row, RowIssue):
            continue
        if is_kto_row(row):
            return itertools.chain(held, rows)
        kind = other_kind(row)
        if kind is not None:
            raise DataError(
                f"{label}: {path} holds {kind}, not KTO rows (first row, {ref}, has keys: {_keys(row)}). "
                f"Method kto needs rows with {KTO_KEYS}"
            )
        first = first or (ref, list(row))
    if first is not None:
        raise DataError(
            f"{label}: no row of {path} is a KTO row (first row, {first[0]}, has keys: "
            f"{_keys(dict.fromkeys(first[1]))}). Expected keys: {KTO_KEYS}, or set {label}.format: kto"
        )
    return iter(held)


def _keys(row: dict[str, Any]) -> str:
    keys = list(row)
    return (", ".join(repr(k) for k in keys[:12]) + (", ..." if len(keys) > 12 else "")) or "none"


# --- building -----------------------------------------------------------------------------------


@dataclass
class KTOReport(DataReport):
    """The SFT report, counting examples, plus how many of each label were kept for training."""

    desirable: int = 0
    undesirable: int = 0
    advice: str = ""
    """The class-balance advice of the KTO paper, when the weights are outside its range."""

    def summary(self) -> str:
        parts = [
            f"{self.rows_read} rows read",
            f"{self.train_samples} train / {self.eval_samples} eval examples "
            f"({self.desirable} desirable, {self.undesirable} undesirable)",
            f"{self.train_tokens} tokens ({self.trained_tokens} trained)",
            f"{self.truncated} prompts truncated",
            f"{len(self.skipped)} skipped",
            f"{len(self.dropped)} dropped",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates removed")
        return ", ".join(parts) + (f"; {self.advice}" if self.advice else "")


@dataclass
class _Loaded:
    examples: list[TokenizedKTO]
    report: SourceReport


def build_kto_data(cfg: DataConfig, tokenizer: Any, weights: tuple[float, float] = (1.0, 1.0)) -> BuiltData:
    """Train and eval `TokenizedKTO`s (in `BuiltData.train` / `.eval`) and a `KTOReport`.

    `weights` (kto.desirable_weight, kto.undesirable_weight) only feed the class-balance advice.
    """
    _check_supported(cfg)
    report = KTOReport()
    train_parts = [
        _load_source(s, f"data.train[{i}]", cfg, tokenizer, report) for i, s in enumerate(cfg.train)
    ]
    eval_parts = [_load_source(s, f"data.eval[{i}]", cfg, tokenizer, report) for i, s in enumerate(cfg.eval)]
    check_loss_budget(report, cfg.max_dropped_fraction)

    train, evaluation = pool_and_split(
        [(p.examples, p.report) for p in train_parts],
        [(p.examples, p.report) for p in eval_parts],
        cfg,
        report,
        key=lambda e: (tuple(e.prompt_ids), tuple(e.completion_ids), e.desirable),
        tokens=forward_tokens,
    )

    if len(train) < 2:
        raise DataError(
            f"{len(train)} training example(s) left after reading and tokenizing; KTO needs at least 2 "
            f"(each completion's KL term pairs it with another example's prompt): {report.summary()}"
        )
    report.sources = [p.report for p in train_parts + eval_parts]
    report.train_samples, report.eval_samples = len(train), len(evaluation)
    report.train_tokens = sum(forward_tokens(e) for e in train)
    report.trained_tokens = sum(len(e.completion_ids) for e in train)
    report.desirable = sum(e.desirable for e in train)
    report.undesirable = len(train) - report.desirable
    report.advice = balance_advice(report.desirable, report.undesirable, *weights) or ""
    return BuiltData(train, evaluation, report)  # type: ignore[arg-type]


def forward_tokens(example: TokenizedKTO) -> int:
    """Tokens the model reads per example: its own sequence, and its completion after another prompt.

    The mismatched sequence's prompt belongs to another example; counted with this one's length,
    which is what it is on average.
    """
    return 2 * (len(example.prompt_ids) + len(example.completion_ids))


def balance_advice(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """The KTO paper's advice (Eq. 8) when the weighted class sizes are out of balance, else None."""
    if not desirable or not undesirable:
        missing = "desirable (label true)" if not desirable else "undesirable (label false)"
        return f"no {missing} training examples: KTO then only pushes one way"
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return None
    d_low, d_high = (undesirable_weight * undesirable / desirable * b for b in (low, high))
    u_low, u_high = (desirable_weight * desirable / undesirable / b for b in (high, low))
    return (
        f"{desirable} desirable vs {undesirable} undesirable examples: the KTO paper (Eq. 8) keeps "
        f"desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3] (now {ratio:.2f}); "
        f"set kto.desirable_weight in [{d_low:.2f}, {d_high:.2f}] or kto.undesirable_weight in "
        f"[{u_low:.2f}, {u_high:.2f}]"
    )


def _check_supported(cfg: DataConfig) -> None:
    if cfg.streaming:
        raise DataError("data.streaming is not supported for method kto yet: set data.streaming: false")
    refuse_mixtures(cfg, "method kto", "each row used once")


def _load_source(
    source: DataSource, label: str, cfg: DataConfig, tokenizer: Any, report: KTOReport
) -> _Loaded:
    template = source_template(source, label, cfg, tokenizer, "kto") or ""
    result = read_kto_samples(source.path, source.format, cfg.on_error, label)
    done = tokenize_kto_rows(result.samples, tokenizer, template, cfg.seq_len, cfg.reasoning)
    if done.failed and cfg.on_error == "raise":
        raise BadRowError(done.failed[0])
    report.rows_read += result.rows_read
    report.truncated += done.truncated
    report.skipped.extend(result.issues + done.failed)
    report.dropped.extend(done.dropped)
    counts = SourceReport(
        label,
        source.path,
        rows_read=result.rows_read,
        skipped=len(result.issues) + len(done.failed),
        dropped=len(done.dropped),
    )
    return _Loaded(done.examples, counts)


# --- preview ------------------------------------------------------------------------------------


def _verdict(example: TokenizedKTO) -> str:
    return "desirable" if example.desirable else "undesirable"


def kto_parts(example: TokenizedKTO) -> list[tuple[str, list[int]]]:
    return [("prompt", example.prompt_ids), (f"completion ({_verdict(example)})", example.completion_ids)]


def kto_header(example: TokenizedKTO, index: int, total: int) -> str:
    cut = ", prompt truncated" if example.truncated else ""
    return (
        f"example {index + 1} of {total} ({example.source}, {_verdict(example)}, prompt "
        f"{len(example.prompt_ids)} tokens, completion {len(example.completion_ids)}{cut})"
    )


def marked_kto(tokenizer: Any, example: TokenizedKTO) -> str:
    """The example as labelled blocks, the scored completion wrapped in `[[` `]]`."""
    return marked_parts(tokenizer, kto_parts(example))


def rich_kto(tokenizer: Any, example: TokenizedKTO) -> Any:
    """The example as a `rich.text.Text`: labels bold, the prompt dim, the completion bold green."""
    return rich_parts(tokenizer, kto_parts(example))


def kto_record(tokenizer: Any, example: TokenizedKTO) -> dict[str, Any]:
    """One example as JSON-ready data: the packed sequence with its label mask (-100: not scored)."""
    ids = [*example.prompt_ids, *example.completion_ids]
    return {
        "source": str(example.source),
        "label": example.desirable,
        "input_ids": ids,
        "labels": [-100] * len(example.prompt_ids) + list(example.completion_ids),
        "prompt_ids": list(example.prompt_ids),
        "completion_ids": list(example.completion_ids),
        "prompt": decode(tokenizer, example.prompt_ids),
        "completion": decode(tokenizer, example.completion_ids),
        "truncated": example.truncated,
    }


def kto_summary_lines(built: BuiltData) -> list[str]:
    """The counts to check before training: examples per label, tokens, losses, per source, problems."""
    report = built.report
    desirable = getattr(report, "desirable", 0)
    lines = [
        f"examples: {report.train_samples} train ({desirable} desirable, "
        f"{report.train_samples - desirable} undesirable), {report.eval_samples} eval",
        f"tokens: {report.train_tokens} read by the model, KL sequences included "
        f"({report.trained_tokens} trained)",
        f"prompts truncated: {report.truncated}  skipped: {len(report.skipped)}  "
        f"dropped: {len(report.dropped)}  duplicates: {report.duplicates}",
    ]
    advice = getattr(report, "advice", "")
    if advice:
        lines.append(f"balance: {advice}")
    lines.append("sources:")
    lines += [f"  {source.line()}" for source in report.sources]
    problems = report.skipped + report.dropped
    if problems:
        lines.append("skipped and dropped rows:")
        lines += [f"  {issue}" for issue in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    return lines
