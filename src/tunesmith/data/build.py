"""Config -> tokenized train/eval samples plus a report of everything dropped or truncated."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data.conversation import Conversation, Sample, TextSample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.tokenize import TokenizedSample, tokenize_conversation, tokenize_text


@dataclass
class DataReport:
    rows_read: int = 0
    skipped: list[RowIssue] = field(default_factory=list)  # bad rows (on_error: skip)
    dropped: list[RowIssue] = field(default_factory=list)  # valid rows with nothing to train on
    truncated: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    packing_fill: float | None = None

    def summary(self) -> str:
        parts = [
            f"{self.rows_read} rows read",
            f"{self.train_samples} train / {self.eval_samples} eval samples",
            f"{self.train_tokens} tokens ({self.trained_tokens} trained)",
            f"{self.truncated} truncated",
            f"{len(self.skipped)} skipped",
            f"{len(self.dropped)} dropped",
        ]
        if self.packing_fill is not None:
            parts.append(f"packing fill {self.packing_fill:.1%}")
        return ", ".join(parts)


@dataclass
class BuiltData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport


def read_sources(sources: list[DataSource], on_error: str, label: str, report: DataReport) -> list[Sample]:
    from tunesmith.data.validate import read_samples

    samples: list[Sample] = []
    for index, source in enumerate(sources):
        result = read_samples(source.path, source.format, on_error=on_error, label=f"{label}[{index}]")
        report.rows_read += result.rows_read
        report.skipped.extend(result.issues)
        samples.extend(result.samples)
    return samples


def tokenize_samples(
    samples: list[Sample],
    tokenizer: Any,
    template: str | None,
    cfg: DataConfig,
    method: str,
    report: DataReport,
) -> list[TokenizedSample]:
    out: list[TokenizedSample] = []
    for sample in samples:
        if isinstance(sample, TextSample):
            if method != "pretrain":
                raise DataError(
                    f"{sample.source}: a raw-text row needs method: pretrain (method is {method!r})"
                )
            out.extend(tokenize_text(tokenizer, sample, cfg.seq_len))
            continue
        if method == "pretrain":
            raise DataError(f"{sample.source}: method 'pretrain' needs raw text rows (a 'text' field)")
        assert isinstance(sample, Conversation)
        tokenized = tokenize_conversation(tokenizer, template or "", sample, cfg.seq_len, cfg.train_on_prompt)
        report.truncated += tokenized.truncated
        if tokenized.num_trained == 0:
            reason = "no trained tokens left after truncation" if tokenized.truncated else "no trained tokens"
            report.dropped.append(RowIssue(sample.source, f"{reason} (seq_len {cfg.seq_len})"))
            continue
        out.append(tokenized)
    return out


def build_data(cfg: DataConfig, tokenizer: Any, method: str) -> BuiltData:
    from tunesmith.data.templates import resolve_template

    report = DataReport()
    template = None if method == "pretrain" else resolve_template(tokenizer, cfg.template)
    train_rows = read_sources(cfg.train, cfg.on_error, "data.train", report)
    if cfg.eval:
        eval_rows = read_sources(cfg.eval, cfg.on_error, "data.eval", report)
    else:
        train_rows, eval_rows = split_eval(train_rows, cfg.eval_split)
    train = tokenize_samples(train_rows, tokenizer, template, cfg, method, report)
    evaluation = tokenize_samples(eval_rows, tokenizer, template, cfg, method, report)
    _check_loss_budget(report, cfg.max_dropped_fraction)
    if not train:
        raise DataError("no training samples left after reading and tokenizing: " + report.summary())
    report.train_samples, report.eval_samples = len(train), len(evaluation)
    report.train_tokens = sum(len(s.input_ids) for s in train)
    report.trained_tokens = sum(s.num_trained for s in train)
    return BuiltData(train, evaluation, report)


def split_eval(samples: list[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded random `fraction` of rows (at least one when fraction > 0), keeping file order."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    count = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(random.Random(seed).sample(range(len(samples)), count))
    return [s for i, s in enumerate(samples) if i not in held], [
        s for i, s in enumerate(samples) if i in held
    ]


def _check_loss_budget(report: DataReport, limit: float) -> None:
    lost = len(report.skipped) + len(report.dropped)
    if report.rows_read and lost / report.rows_read > limit:
        examples = "; ".join(str(i) for i in (report.skipped + report.dropped)[:5])
        raise DataError(
            f"{lost} of {report.rows_read} rows were skipped or dropped, more than data.max_dropped_fraction "
            f"({limit:.0%}); first: {examples}"
        )
