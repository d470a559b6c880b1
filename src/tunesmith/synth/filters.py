"""Row filters, each counted: exact and near-duplicate questions, ungrounded answers, lengths.

Near duplicates use word-trigram shingle Jaccard of our own (no dependency): exact for the few
thousand rows a document set gives, where MinHash's approximation buys nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tunesmith.synth.config import Filters

_WORD = re.compile(r"\w+")
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "by",
        "with",
        "from",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "which",
        "who",
        "what",
        "when",
        "where",
        "how",
        "why",
        "not",
        "no",
    ]
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + k]) for i in range(max(1, len(w) - k + 1))}


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def grounding(answer: str, chunk: str) -> float:
    """Fraction of the answer's content words that occur in the chunk."""
    content = [w for w in words(answer) if w not in STOPWORDS]
    if not content:
        return 1.0
    have = set(words(chunk))
    return sum(w in have for w in content) / len(content)


@dataclass
class Row:
    question: str
    answer: str
    chunk_text: str
    provenance: dict[str, Any]
    reasoning: str | None = None
    """Asked for with `reasoning: keep|strip`; filters look at the answer alone."""


def apply_filters(rows: list[Row], cfg: Filters) -> tuple[list[Row], Counter[str]]:
    """Rows kept, in order, and how many each filter removed (first failing filter counts)."""
    removed: Counter[str] = Counter()
    kept: list[Row] = []
    seen_exact: set[str] = set()
    seen_shingles: list[set[tuple[str, ...]]] = []
    for row in rows:
        q, a = row.question, row.answer
        if not (cfg.min_question_chars <= len(q) <= cfg.max_question_chars):
            removed["question_length"] += 1
            continue
        if not (cfg.min_answer_chars <= len(a) <= cfg.max_answer_chars):
            removed["answer_length"] += 1
            continue
        norm = " ".join(words(q))
        if norm in seen_exact:
            removed["exact_duplicate"] += 1
            continue
        sh = shingles(q)
        if any(jaccard(sh, other) >= cfg.near_dup_threshold for other in seen_shingles):
            removed["near_duplicate"] += 1
            continue
        if grounding(a, row.chunk_text) < cfg.min_grounding:
            removed["ungrounded"] += 1
            continue
        seen_exact.add(norm)
        seen_shingles.append(sh)
        kept.append(row)
    return kept, removed
