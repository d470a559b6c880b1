"""Config -> tokenized preference pairs for dpo, simpo, orpo and reward, with the same report as SFT.

Per source: read and validate its pairs (`read_samples(pairs=True)`), tokenize them with its
template. Bad rows follow `data.on_error` (the first stops the run, or each is skipped and
listed), pairs that do not fit `data.seq_len` are dropped and listed, and
`data.max_dropped_fraction` aborts a run that loses too much. Then, over all training sources:
`data.dedup`, the eval split (`data.eval_split` when no `data.eval` files are given) and the
shuffle (`data.seed`), as for SFT. Sources are concatenated, each pair once: mixture weights,
`samples` and streaming are refused for now, and pairs are not cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data.build import (
    BuiltData,
    DataReport,
    SourceReport,
    check_loss_budget,
    source_template,
)
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.pooling import pool_and_split, refuse_mixtures
from tunesmith.data.preference_formats import PREFERENCE_METHODS
from tunesmith.data.preference_tokenize import TokenizedPair, tokenize_pairs

__all__ = ["PREFERENCE_METHODS", "PreferenceReport", "TokenizedPair", "build_preference_data"]


@dataclass
class PreferenceReport(DataReport):
    """The SFT report, counting pairs, plus the pairs kept whose two answers are the same."""

    identical: list[RowIssue] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.rows_read} rows read",
            f"{self.train_samples} train / {self.eval_samples} eval pairs",
            f"{self.train_tokens} tokens ({self.trained_tokens} scored)",
            f"{self.truncated} prompts truncated",
            f"{len(self.skipped)} skipped",
            f"{len(self.dropped)} dropped",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates removed")
        if self.identical:
            parts.append(f"{len(self.identical)} with chosen identical to rejected")
        return ", ".join(parts)


@dataclass
class _Loaded:
    pairs: list[TokenizedPair]
    report: SourceReport


def build_preference_data(cfg: DataConfig, tokenizer: Any, method: str) -> BuiltData:
    """Train and eval `TokenizedPair`s (in `BuiltData.train` / `.eval`) and a `PreferenceReport`."""
    _check_supported(cfg, method)
    report = PreferenceReport()
    train_parts = [
        _load_source(s, f"data.train[{i}]", cfg, tokenizer, method, report) for i, s in enumerate(cfg.train)
    ]
    eval_parts = [
        _load_source(s, f"data.eval[{i}]", cfg, tokenizer, method, report) for i, s in enumerate(cfg.eval)
    ]
    check_loss_budget(report, cfg.max_dropped_fraction)

    train, evaluation = pool_and_split(
        [(p.pairs, p.report) for p in train_parts],
        [(p.pairs, p.report) for p in eval_parts],
        cfg,
        report,
        key=lambda pair: (tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids)),
        tokens=forward_tokens,
    )

    if not train:
        raise DataError("no training pairs left after reading and tokenizing: " + report.summary())
    report.sources = [p.report for p in train_parts + eval_parts]
    report.train_samples, report.eval_samples = len(train), len(evaluation)
    report.train_tokens = sum(forward_tokens(p) for p in train)
    report.trained_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in train)
    return BuiltData(train, evaluation, report)  # type: ignore[arg-type]


def forward_tokens(pair: TokenizedPair) -> int:
    """Tokens the model reads for a pair: the prompt before each answer, and both answers."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def _check_supported(cfg: DataConfig, method: str) -> None:
    if method not in PREFERENCE_METHODS:
        raise DataError(
            f"method {method!r} does not train on preference pairs ({', '.join(PREFERENCE_METHODS)} do)"
        )
    if cfg.streaming:
        raise DataError(
            f"data.streaming is not supported for preference pairs yet (method {method}): "
            f"set data.streaming: false to load the pairs in memory"
        )
    refuse_mixtures(cfg, "preference pairs", "each pair used once")


def _load_source(
    source: DataSource, label: str, cfg: DataConfig, tokenizer: Any, method: str, report: PreferenceReport
) -> _Loaded:
    from tunesmith.data.validate import BadRowError, read_samples

    template = source_template(source, label, cfg, tokenizer, method) or ""
    result = read_samples(source.path, source.format, on_error=cfg.on_error, label=label, pairs=True)
    done = tokenize_pairs(result.samples, tokenizer, template, cfg.seq_len, cfg.reasoning)
    if done.failed and cfg.on_error == "raise":
        raise BadRowError(done.failed[0])
    report.rows_read += result.rows_read
    report.truncated += done.truncated
    report.skipped.extend(result.issues + done.failed)
    report.dropped.extend(done.dropped)
    report.identical.extend(result.notes)
    counts = SourceReport(
        label,
        source.path,
        rows_read=result.rows_read,
        skipped=len(result.issues) + len(done.failed),
        dropped=len(done.dropped),
    )
    return _Loaded(done.pairs, counts)
