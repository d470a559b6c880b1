"""Config -> tokenized train/eval samples plus a report of everything dropped or truncated.

Per source: read and validate its rows, tokenize them with its template (in parallel for large
sources), or load all of that from the cache. Then, over all training sources: drop exact
duplicates (`data.dedup`), hold out `data.eval_split` when no eval files are given, apply the
mixture (`weight` / `samples` per source) and shuffle with `data.seed`. Every row that does not
become a sample is counted in the report, per source.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data import cache
from tunesmith.data.batch_tokenize import TokenizeSettings, tokenize_all
from tunesmith.data.cache import CachedSource
from tunesmith.data.conversation import Conversation, Sample, TextSample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.tokenize import TokenizedSample

T = TypeVar("T")

SHOW_TOKENIZING_FROM_ROWS = 2000
"""Sources with fewer rows tokenize in a moment: no progress line of their own."""
Pool = list[tuple[int, TokenizedSample]]
"""Samples of several sources, each with the index of its source."""


@dataclass
class SourceReport:
    """What became of one source's rows."""

    label: str  # data.train[0]
    path: str
    rows_read: int = 0
    skipped: int = 0  # bad rows (on_error: skip)
    dropped: int = 0  # valid rows with nothing to train on
    duplicates: int = 0  # removed by data.dedup
    held_out: int = 0  # moved to eval by data.eval_split
    available: int = 0  # usable samples before the mixture
    used: int = 0  # samples in the final set (repeats counted)
    tokens: int = 0  # tokens of the used samples
    from_cache: bool = False

    def line(self) -> str:
        parts = [f"{self.rows_read} rows", f"{self.used} samples used ({self.tokens} tokens)"]
        if self.used != self.available:
            parts.append(f"of {self.available} available")
        for count, what in (
            (self.skipped, "skipped"),
            (self.dropped, "dropped"),
            (self.duplicates, "duplicates removed"),
            (self.held_out, "held out for eval"),
        ):
            if count:
                parts.append(f"{count} {what}")
        cached = " [cached]" if self.from_cache else ""
        return f"{self.label} {self.path}: " + ", ".join(parts) + cached


@dataclass
class DataReport:
    rows_read: int = 0
    skipped: list[RowIssue] = field(default_factory=list)  # bad rows (on_error: skip)
    dropped: list[RowIssue] = field(default_factory=list)  # valid rows with nothing to train on
    truncated: int = 0
    duplicates: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    packing_fill: float | None = None
    sources: list[SourceReport] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{self.rows_read} rows read",
            f"{self.train_samples} train / {self.eval_samples} eval samples",
            f"{self.train_tokens} tokens ({self.trained_tokens} trained)",
            f"{self.truncated} truncated",
            f"{len(self.skipped)} skipped",
            f"{len(self.dropped)} dropped",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates removed")
        if self.packing_fill is not None:
            parts.append(f"packing fill {self.packing_fill:.1%}")
        return ", ".join(parts)


@dataclass
class BuiltData:
    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    report: DataReport


@dataclass
class _Loaded:
    samples: list[TokenizedSample]
    report: SourceReport


class FingerprintedTokenizer:
    """The tokenizer plus its fingerprint, computed once and only if the cache needs it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = cache.tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint


def tokenize_settings(cfg: DataConfig, tokenizer: Any, method: str) -> TokenizeSettings:
    """The settings that decide a sample's tokens; a pretrain overlap that cannot work stops here."""
    overlap = 0
    if method == "pretrain":
        from tunesmith.data.tokenize import bos_token_id, check_overlap

        overlap = cfg.pretrain_overlap
        check_overlap(overlap, cfg.seq_len, bos_token_id(tokenizer) is not None)
    return TokenizeSettings(
        cfg.seq_len, method, cfg.train_on_prompt, cfg.mask_history, cfg.reasoning, overlap
    )


def build_data(cfg: DataConfig, tokenizer: Any, method: str) -> BuiltData:
    report = DataReport()
    settings = tokenize_settings(cfg, tokenizer, method)
    tok = FingerprintedTokenizer(tokenizer)
    train_parts = [
        load_source(s, f"data.train[{i}]", cfg, tok, settings, report) for i, s in enumerate(cfg.train)
    ]
    eval_parts = [
        load_source(s, f"data.eval[{i}]", cfg, tok, settings, report) for i, s in enumerate(cfg.eval)
    ]
    check_loss_budget(report, cfg.max_dropped_fraction)

    pool, eval_pool = _pooled(train_parts), _pooled(eval_parts)
    if cfg.dedup:
        pool, eval_pool = _dedup(pool, train_parts, report), _dedup(eval_pool, eval_parts, report)
    if cfg.eval:
        _count_used(eval_pool, eval_parts)
    else:
        pool, eval_pool = split_eval(pool, cfg.eval_split, cfg.seed)
        for k, _ in eval_pool:
            train_parts[k].report.held_out += 1
    train = _mix(pool, train_parts, cfg)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(train)
    evaluation = [s for _, s in eval_pool]

    if not train:
        raise DataError("no training samples left after reading and tokenizing: " + report.summary())
    report.sources = [p.report for p in train_parts + eval_parts]
    report.train_samples, report.eval_samples = len(train), len(evaluation)
    report.train_tokens = sum(len(s.input_ids) for s in train)
    report.trained_tokens = sum(s.num_trained for s in train)
    return BuiltData(train, evaluation, report)


def load_source(
    source: DataSource,
    label: str,
    cfg: DataConfig,
    tok: FingerprintedTokenizer,
    settings: TokenizeSettings,
    report: DataReport,
) -> _Loaded:
    """One source's tokenized samples, from the cache when an entry for exactly this input exists."""
    from tunesmith.data.sources import resolve_files

    template = source_template(source, label, cfg, tok.tokenizer, settings.method)
    files = resolve_files(source.path, label)
    key = None
    entry = None
    if cfg.cache and cache.worth_caching(files):
        key = cache.source_key(
            source.path, files, source.format, tok.fingerprint(), template, settings, cfg.on_error
        )
        entry = cache.load(key)
    from_cache = entry is not None
    if entry is None:
        entry = _read_and_tokenize(source, label, cfg, tok.tokenizer, template, settings)
        if key is not None:
            cache.save(key, entry)
    samples = entry.block.to_samples()
    report.rows_read += entry.rows_read
    report.truncated += entry.truncated
    report.skipped.extend(entry.skipped)
    report.dropped.extend(entry.dropped)
    source_report = SourceReport(
        label,
        source.path,
        rows_read=entry.rows_read,
        skipped=len(entry.skipped),
        dropped=len(entry.dropped),
        from_cache=from_cache,
    )
    return _Loaded(samples, source_report)


def _read_and_tokenize(
    source: DataSource,
    label: str,
    cfg: DataConfig,
    tokenizer: Any,
    template: str | None,
    settings: TokenizeSettings,
) -> CachedSource:
    from tunesmith.data.validate import BadRowError, read_samples
    from tunesmith.training.progress import phase

    result = read_samples(source.path, source.format, on_error=cfg.on_error, label=label)
    _check_method(result.samples, settings.method)
    if len(result.samples) < SHOW_TOKENIZING_FROM_ROWS:
        done = tokenize_all(result.samples, tokenizer, template, settings, cfg.num_proc)
    else:
        rows = len(result.samples)
        with phase(f"tokenizing {Path(source.path).name} ({rows:,} rows)", total=rows) as shown:
            done = tokenize_all(result.samples, tokenizer, template, settings, cfg.num_proc, shown.advance)
    if done.failed and cfg.on_error == "raise":
        raise BadRowError(done.failed[0])
    return CachedSource(
        done.block, result.rows_read, done.truncated, result.issues + done.failed, done.dropped
    )


def source_template(
    source: DataSource, label: str, cfg: DataConfig, tokenizer: Any, method: str
) -> str | None:
    from tunesmith.data.templates import ChatTemplateError, resolve_template

    if method == "pretrain":
        return None
    if source.template is None:
        return resolve_template(tokenizer, cfg.template)
    try:
        return resolve_template(tokenizer, source.template)
    except ChatTemplateError as exc:
        raise ChatTemplateError(str(exc).replace("data.template", f"{label}.template")) from None


def _check_method(samples: Sequence[Sample], method: str) -> None:
    for sample in samples:
        if isinstance(sample, TextSample) and method != "pretrain":
            raise DataError(f"{sample.source}: a raw-text row needs method: pretrain (method is {method!r})")
        if isinstance(sample, Conversation) and method == "pretrain":
            raise DataError(f"{sample.source}: method 'pretrain' needs raw text rows (a 'text' field)")


def _pooled(parts: list[_Loaded]) -> Pool:
    return [(k, sample) for k, part in enumerate(parts) for sample in part.samples]


def _count_used(pool: Pool, parts: list[_Loaded]) -> None:
    for k, sample in pool:
        counts = parts[k].report
        counts.available, counts.used = counts.available + 1, counts.used + 1
        counts.tokens += len(sample.input_ids)


def _dedup(pool: Pool, parts: list[_Loaded], report: DataReport) -> Pool:
    from tunesmith.data.mixture import duplicates

    kept = []
    for (k, sample), repeated in zip(pool, duplicates([s for _, s in pool]), strict=True):
        if repeated:
            parts[k].report.duplicates += 1
            report.duplicates += 1
        else:
            kept.append((k, sample))
    return kept


def _mix(
    pool: list[tuple[int, TokenizedSample]], parts: list[_Loaded], cfg: DataConfig
) -> list[TokenizedSample]:
    """Apply each source's `weight` / `samples`; the result is in source order (shuffled later)."""
    from tunesmith.data.mixture import choose, plan_counts, source_rng

    by_source: list[list[TokenizedSample]] = [[] for _ in parts]
    for k, sample in pool:
        by_source[k].append(sample)
    counts = plan_counts(
        [len(s) for s in by_source], [s.weight for s in cfg.train], [s.samples for s in cfg.train]
    )
    out: list[TokenizedSample] = []
    for k, (samples, count) in enumerate(zip(by_source, counts, strict=True)):
        chosen = [samples[i] for i in choose(len(samples), count, source_rng(cfg.seed, k))]
        report = parts[k].report
        report.available, report.used = len(samples), len(chosen)
        report.tokens = sum(len(s.input_ids) for s in chosen)
        out.extend(chosen)
    return out


def split_eval(samples: list[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Hold out a seeded random `fraction` of rows (at least one when fraction > 0), keeping file order."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    count = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(random.Random(seed).sample(range(len(samples)), count))
    return [s for i, s in enumerate(samples) if i not in held], [
        s for i, s in enumerate(samples) if i in held
    ]


def check_loss_budget(report: DataReport, limit: float, scope: str = "") -> None:
    """Stop when more than `limit` of the rows read (`scope`: which ones) were skipped or dropped."""
    lost = len(report.skipped) + len(report.dropped)
    if report.rows_read and lost / report.rows_read > limit:
        examples = "; ".join(str(i) for i in (report.skipped + report.dropped)[:5])
        raise DataError(
            f"{lost} of {report.rows_read} rows {scope}were skipped or dropped, more than "
            f"data.max_dropped_fraction ({limit:.0%}); first: {examples}"
        )
