"""Chunks of a document: by headings with a size cap, or by tokens with overlap; cut between sentences."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.synth.readers import Document, ReaderError

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


def _longest_fit(cands: list[int], s: int, size: Callable[[int, int], int], cap: int) -> int | None:
    """The largest candidate end `c` with size(s, c) <= cap (sizes grow with the end), by bisection."""
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if size(s, cands[mid]) <= cap:
            best, lo = cands[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _hard_split(
    text: str, span: tuple[int, int], size: Callable[[int, int], int], cap: int
) -> list[tuple[int, int]]:
    """A sentence over the cap, cut at the last whitespace that fits (only when unavoidable); a single
    word over the cap is cut between characters."""
    out, (s, e) = [], span
    while size(s, e) > cap:
        gaps = [(m.start(), m.end()) for m in re.finditer(r"\s+", text[s:e])]
        cut = _longest_fit([s + a for a, _ in gaps if a > 0], s, size, cap)
        if cut is not None:
            out.append((s, cut))
            s = next(s + b for a, b in gaps if s + a == cut)
            continue
        cut = _longest_fit(list(range(s + 1, e)), s, size, cap) or s + 1
        out.append((s, cut))
        s = cut
    out.append((s, e))
    return out


def _window_end(pieces: list[tuple[int, int]], i: int, size: Callable[[int, int], int], cap: int) -> int:
    """The end j of the longest run pieces[i:j] that fits in `cap` (at least one piece): doubling
    steps, then bisection, so a window of k sentences costs O(log k) counts of about its length."""
    start = pieces[i][0]

    def fits(j: int) -> bool:
        return size(start, pieces[j - 1][1]) <= cap

    lo, step = i + 1, 1  # pieces[i:lo] fits (or is the one piece a window always takes)
    while lo + step <= len(pieces) and fits(lo + step):
        lo, step = lo + step, step * 2
    hi = min(lo + step, len(pieces) + 1)  # pieces[i:hi] does not fit, or runs past the end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _pack(
    text: str, spans: list[tuple[int, int]], size: Callable[[int, int], int], cap: int, overlap: int
) -> list[tuple[int, int]]:
    """Consecutive sentences into windows of at most `cap`, the next one repeating up to `overlap`."""
    pieces = [p for sp in spans for p in (_hard_split(text, sp, size, cap) if size(*sp) > cap else [sp])]
    windows, i = [], 0
    while i < len(pieces):
        j = _window_end(pieces, i, size, cap)
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
        for s, e in _pack(text, _sentences(text, start, end), lambda a, b: b - a, max_chars, 0):
            chunks.append(Chunk(doc.path, len(chunks), s, e, text[s:e], heads, doc.page_at(s)))
    return chunks


def chunk_by_tokens(
    doc: Document, count_tokens: Callable[[str], int], max_tokens: int, overlap: int
) -> list[Chunk]:
    """Windows of whole sentences of at most `max_tokens` tokens, neighbours sharing up to `overlap`."""
    text = doc.text
    size = lambda a, b: count_tokens(text[a:b])  # noqa: E731
    windows = _pack(text, _sentences(text, 0, len(text)), size, max_tokens, overlap)
    return [Chunk(doc.path, i, s, e, text[s:e], (), doc.page_at(s)) for i, (s, e) in enumerate(windows)]


def token_counter(tokenizer: str | None) -> Callable[[str], int]:
    """Tokens of a text as the target model counts them: `default` (the default model's tokenizer) or a
    folder with a tokenizer; None counts whitespace-separated words."""
    if tokenizer is None:
        return lambda s: len(s.split())
    from tunesmith.models.load import load_tokenizer

    if tokenizer == "default":
        from tunesmith.models.default_model import default_tokenizer_dir

        folder = default_tokenizer_dir()
    else:
        folder = Path(tokenizer)
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ReaderError(
                f"chunking.tokenizer {tokenizer!r}: no tokenizer in that folder (tokenizer.json or "
                "tokenizer_config.json); give a model folder, or 'default' for the default model's tokenizer"
            )
    tok = load_tokenizer(folder)
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
