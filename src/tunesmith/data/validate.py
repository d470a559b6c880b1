"""From a `path` setting to validated samples, with every bad row either raised or reported.

`read_samples` is what training uses: it stops at the first bad row (`on_error="raise"`, naming
`file:line: reason`) or keeps the good rows and lists the bad ones (`on_error="skip"`), never
dropping a row silently. `check_files` lists every problem at once for `tunesmith data check`.

`pairs=True` reads preference pairs (`PreferenceSample`) instead of conversations and text. A file
holding the other kind is refused as a whole, naming what it holds and what the method needs,
rather than row by row with reasons that would only confuse.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunesmith.data.conversation import RowRef, Sample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import (
    DEFAULT_MAX_CHARS,
    FORMAT_KEYS,
    FORMATS,
    KTO_FORMAT,
    OTHER_METHOD_FORMATS,
    PAIR_FORMAT,
    PAIR_KEYS,
    RowError,
    detect_format,
    to_sample,
)
from tunesmith.data.preference_formats import (
    IDENTICAL_NOTE,
    PREFERENCE_METHODS,
    PreferenceSample,
    to_pair,
)
from tunesmith.data.sources import RowResult, iter_file_rows, resolve_files

OnError = Literal["raise", "skip"]
SKIP_HINT = "set data.on_error: skip to skip bad rows"

SampleResult = tuple[RowRef, "Sample | PreferenceSample | RowIssue"]
_PAIR_METHODS = ", ".join(PREFERENCE_METHODS)


class BadRowError(DataError):
    """The first bad row under `on_error="raise"`; `issue` lets callers point at it."""

    def __init__(self, issue: RowIssue) -> None:
        super().__init__(f"{issue}\nhint: {SKIP_HINT}")
        self.issue = issue


@dataclass
class SourceResult:
    """What one `path` setting gave: good samples and bad rows, both in file order."""

    samples: list[Any] = field(default_factory=list)
    """`Sample`s, or `PreferenceSample`s when read with `pairs=True`."""
    issues: list[RowIssue] = field(default_factory=list)
    notes: list[RowIssue] = field(default_factory=list)
    """Rows kept but worth a look: preference pairs whose chosen and rejected answers are identical."""
    rows_read: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    """The format used for each file (detected when `fmt="auto"`)."""


def read_samples(
    path: str,
    fmt: str = "auto",
    on_error: OnError = "raise",
    label: str = "data.train[0]",
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    pairs: bool = False,
) -> SourceResult:
    """Read and validate every row a path (file, directory or glob) names."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    result = SourceResult()
    rows = iter_samples(path, fmt, label, max_chars=max_chars, formats=result.formats, pairs=pairs)
    for ref, item in rows:
        result.rows_read += 1
        if isinstance(item, RowIssue):
            if on_error == "raise":
                raise BadRowError(item)
            result.issues.append(item)
            continue
        if isinstance(item, PreferenceSample) and item.identical:
            result.notes.append(RowIssue(ref, IDENTICAL_NOTE))
        result.samples.append(item)
    return result


def check_files(
    paths: str | Sequence[str],
    fmt: str = "auto",
    label: str = "data.train",
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    pairs: bool = False,
) -> list[RowIssue]:
    """Every bad row of every source, for a report; path-level problems still raise DataError.

    `paths[i]` is named `{label}[i]` in messages (a single string is `{label}[0]`).
    """
    sources = [paths] if isinstance(paths, str) else list(paths)
    issues: list[RowIssue] = []
    for i, path in enumerate(sources):
        result = read_samples(path, fmt, "skip", f"{label}[{i}]", max_chars=max_chars, pairs=pairs)
        issues.extend(result.issues)
    return issues


def iter_samples(
    path: str,
    fmt: str = "auto",
    label: str = "data.train[0]",
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    formats: dict[str, str] | None = None,
    pairs: bool = False,
) -> Iterator[SampleResult]:
    """Stream `(ref, sample or issue)` in file order; path and format errors raise now.

    `formats`, when given, receives the format used for each file as it is opened.
    """
    known = (*FORMATS, PAIR_FORMAT)
    if fmt in OTHER_METHOD_FORMATS:
        raise DataError(
            f"{label}.format: {fmt} rows train with method {OTHER_METHOD_FORMATS[fmt]}, not this one "
            f"(set method: {OTHER_METHOD_FORMATS[fmt]}, or use a format of: auto, {', '.join(known)})"
        )
    if fmt != "auto" and fmt not in known:
        raise DataError(f"{label}.format: unknown format {fmt!r} (known: auto, {', '.join(known)})")
    if fmt != "auto":
        _check_kind(fmt, pairs, f"{label}.format")
    files = resolve_files(path, label)
    used = formats if formats is not None else {}
    return itertools.chain.from_iterable(_file_samples(f, fmt, label, max_chars, used, pairs) for f in files)


def _check_kind(fmt: str, pairs: bool, where: str) -> None:
    """Pairs for a preference method, conversations or text for the others: never a mix-up."""
    if pairs and fmt != PAIR_FORMAT:
        raise DataError(
            f"{where} holds {fmt} rows, not preference pairs: a preference method ({_PAIR_METHODS}) "
            f"needs rows with {PAIR_KEYS}"
        )
    if fmt == KTO_FORMAT:
        raise DataError(
            f"{where} holds KTO rows (a completion with a true/false label): they train with method kto, "
            "not this one (an undesirable completion must never be trained on as an answer)"
        )
    if not pairs and fmt == PAIR_FORMAT:
        raise DataError(
            f"{where} holds preference pairs (chosen/rejected), which train with a preference method "
            f"({_PAIR_METHODS}), not this one"
        )


def _file_samples(
    path: Path, fmt: str, label: str, max_chars: int, formats: dict[str, str], pairs: bool
) -> Iterator[SampleResult]:
    rows: Iterator[RowResult] = iter_file_rows(path, label)
    if fmt == "auto":
        detected, rows = _detect(rows, path, label, pairs)
        if detected is None:  # no object rows at all: only unreadable rows (or none) to pass on
            yield from rows  # type: ignore[misc]
            return
        _check_kind(detected, pairs, f"{label}: {path}")
        fmt = detected
    formats[str(path)] = fmt
    for ref, row in rows:
        yield ref, row if isinstance(row, RowIssue) else _convert(row, fmt, ref, max_chars)


def _convert(
    row: dict[str, Any], fmt: str, ref: RowRef, max_chars: int
) -> Sample | PreferenceSample | RowIssue:
    try:
        if fmt == PAIR_FORMAT:
            return to_pair(row, ref, max_chars=max_chars)
        return to_sample(row, fmt, ref, max_chars=max_chars)
    except RowError as e:
        return RowIssue(ref, e.reason)


def _detect(
    rows: Iterator[RowResult], path: Path, label: str, pairs: bool = False
) -> tuple[str | None, Iterator[RowResult]]:
    """The format of the first row whose keys match one, and all rows again (none consumed).

    Rows before it are held back, not judged: they match no format, so the chosen format will
    reject them with a precise reason. A file whose object rows all match nothing is a format
    problem, not a row problem, and raises.
    """
    held: list[RowResult] = []
    first_keys: tuple[RowRef, list[str]] | None = None
    for ref, row in rows:
        held.append((ref, row))
        if isinstance(row, RowIssue):
            continue
        fmt = detect_format(row, pairs)
        if fmt is not None:
            return fmt, itertools.chain(held, rows)
        if first_keys is None:
            first_keys = (ref, list(row))
    if first_keys is None:
        return None, iter(held)
    if pairs:
        raise DataError(_undetected_pairs_message(path, label, *first_keys))
    raise DataError(_undetected_message(path, label, *first_keys))


def _undetected_pairs_message(path: Path, label: str, ref: RowRef, keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:12]) + (", ..." if len(keys) > 12 else "")
    row = dict.fromkeys(keys, "")  # only the keys matter to detection
    other = detect_format(row)
    method = "pretrain" if other == "text" else "sft"
    hint = f"; these look like {other} rows, which train with method {method}" if other else ""
    return (
        f"{label}: no row of {path} is a preference pair (first row, {ref}, has keys: "
        f"{shown or 'none'}). Expected keys: {PAIR_KEYS}{hint}"
    )


def _undetected_message(path: Path, label: str, ref: RowRef, keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:12]) + (", ..." if len(keys) > 12 else "")
    expected = "; ".join(f"{fmt}: {keys}" for fmt, keys in FORMAT_KEYS.items())
    return (
        f"{label}: cannot detect the data format of {path}: no row has the keys of a known format "
        f"(first row, {ref}, has keys: {shown or 'none'}). Expected keys ({expected}), "
        f"or set {label}.format"
    )
