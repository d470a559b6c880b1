"""Pool -> dedup -> eval split -> shuffle, shared by the in-memory builders of pairs, KTO rows and prompts.

Each builder reads and tokenizes its sources on its own (the formats differ); what follows is the
same for all of them and matches SFT's rules: `data.dedup` keeps the first of equal items, held-out
items come from the training sources (`data.eval_split`) unless `data.eval` files are given, each
source's report counts what it contributed, and the training items are shuffled with `data.seed`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from tunesmith.config.schema import DataConfig
from tunesmith.data.build import DataReport, SourceReport, split_eval
from tunesmith.data.errors import DataError

T = TypeVar("T")
Part = tuple[Sequence[T], SourceReport]
"""One source's items and its report."""


def pool_and_split(
    train_parts: Sequence[Part[T]],
    eval_parts: Sequence[Part[T]],
    cfg: DataConfig,
    report: DataReport,
    key: Callable[[T], Hashable],
    tokens: Callable[[T], int],
) -> tuple[list[T], list[T]]:
    """Training and eval items of all sources, deduplicated by `key`, split, counted and shuffled."""
    pool = _pooled(train_parts)
    eval_pool = _pooled(eval_parts)
    if cfg.dedup:
        pool = _dedup(pool, train_parts, report, key)
        eval_pool = _dedup(eval_pool, eval_parts, report, key)
    if cfg.eval:
        _count_used(eval_pool, eval_parts, tokens)
    else:  # held-out items belong to the training sources they came from
        pool, eval_pool = split_eval(pool, cfg.eval_split, cfg.seed)
        for k, _ in eval_pool:
            train_parts[k][1].held_out += 1
    _count_used(pool, train_parts, tokens)
    train = [item for _, item in pool]
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(train)
    return train, [item for _, item in eval_pool]


def refuse_mixtures(cfg: DataConfig, what: str, usage: str) -> None:
    """Mixture weights and `samples` are SFT features; these builders use every item once."""
    for i, source in enumerate(cfg.train):
        key = "weight" if source.weight is not None else "samples" if source.samples is not None else None
        if key is not None:
            raise DataError(
                f"data.train[{i}].{key}: mixtures are not supported for {what} yet; remove {key} "
                f"(sources are concatenated, {usage})"
            )


def _pooled(parts: Sequence[Part[T]]) -> list[tuple[int, T]]:
    return [(k, item) for k, (items, _) in enumerate(parts) for item in items]


def _dedup(
    pool: list[tuple[int, T]], parts: Sequence[Part[T]], report: DataReport, key: Callable[[T], Hashable]
) -> list[tuple[int, T]]:
    seen: set[Hashable] = set()
    kept = []
    for k, item in pool:
        item_key = key(item)
        if item_key in seen:
            parts[k][1].duplicates += 1
            report.duplicates += 1
            continue
        seen.add(item_key)
        kept.append((k, item))
    return kept


def _count_used(pool: list[tuple[int, T]], parts: Sequence[Part[T]], tokens: Callable[[T], int]) -> None:
    for k, item in pool:
        counts = parts[k][1]
        counts.available, counts.used = counts.available + 1, counts.used + 1
        counts.tokens += tokens(item)
