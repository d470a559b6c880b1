"""Chunks of a document: by headings with a size cap, or by tokens with overlap; cut between sentences."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from tunesmith.synth.readers import Document

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n\n")


@dataclass(frozen=True)
class Chunk:
    doc: str
    index: int
    start: int
    end: int
    text: str
    headings: tuple[str, ...]
    page: int | None

    def provenance(self) -> dict[str, object]:
        return {
            "file": self.doc,
            "chunk": self.index,
            "start": self.start,
            "end": self.end,
            "headings": list(self.headings),
            "page": self.page,
        }


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) spans of the sentences in text[start:end], whitespace between them dropped."""
    spans, pos = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < end:
        spans.append((pos, end))
    return spans


def _hard_split(span: tuple[int, int], size: Callable[[int, int], int], cap: int) -> list[tuple[int, int]]:
    """A sentence over the cap, cut at the last whitespace that fits (only when unavoidable)."""
    out, (s, e) = [], span
    while size(s, e) > cap:
        cut = s + 1
        while cut < e and size(s, cut + 1) <= cap:
            cut += 1
        out.append((s, cut))
        s = cut
    out.append((s, e))
    return out


def _pack(
    spans: list[tuple[int, int]], size: Callable[[int, int], int], cap: int, overlap: int
) -> list[tuple[int, int]]:
    """Consecutive sentences into windows of at most `cap`, the next one repeating up to `overlap`."""
    pieces = [p for sp in spans for p in (_hard_split(sp, size, cap) if size(*sp) > cap else [sp])]
    windows, i = [], 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and size(pieces[i][0], pieces[j][1]) <= cap:
            j += 1
        windows.append((pieces[i][0], pieces[j - 1][1]))
        if j >= len(pieces):
            break
        k = j
        while overlap and k - 1 > i and size(pieces[k - 1][0], pieces[j - 1][1]) <= overlap:
            k -= 1
        i = k
    return windows


def chunk_by_headings(doc: Document, max_chars: int) -> list[Chunk]:
    """One chunk per heading section (the heading line included) and page, sections over `max_chars` split."""
    text = doc.text
    marks = [(m.start(), len(m.group(1)), m.group(2).strip()) for m in _HEADING.finditer(text)]
    cuts = {s for s, _, _ in marks} | {s for _, s, _ in doc.pages}  # a chunk never spans two pages
    bounds = [0, *sorted(cuts - {0}), len(text)]
    path: list[tuple[int, str]] = []
    by_start = {s: (lvl, title) for s, lvl, title in marks}
    chunks: list[Chunk] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if start in by_start:
            lvl, title = by_start[start]
            path = [(lv, t) for lv, t in path if lv < lvl] + [(lvl, title)]
        heads = tuple(t for _, t in path)
        if not _HEADING.sub("", text[start:end]).strip():
            continue  # a heading with no text of its own: it only names the sections below
        for s, e in _pack(_sentences(text, start, end), lambda a, b: b - a, max_chars, 0):
            chunks.append(Chunk(doc.path, len(chunks), s, e, text[s:e], heads, doc.page_at(s)))
    return chunks


def chunk_by_tokens(
    doc: Document, count_tokens: Callable[[str], int], max_tokens: int, overlap: int
) -> list[Chunk]:
    """Windows of whole sentences of at most `max_tokens` tokens, neighbours sharing up to `overlap`."""
    text = doc.text
    size = lambda a, b: count_tokens(text[a:b])  # noqa: E731
    windows = _pack(_sentences(text, 0, len(text)), size, max_tokens, overlap)
    return [Chunk(doc.path, i, s, e, text[s:e], (), doc.page_at(s)) for i, (s, e) in enumerate(windows)]
