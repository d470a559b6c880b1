"""Read local data files row by row, keeping where each row came from.

Every row is yielded as `(RowRef, dict)` or `(RowRef, RowIssue)`: a row that cannot be read
(invalid UTF-8, broken JSON, a short CSV record, ...) becomes an issue at its own line instead of
an exception or a silent drop, so the caller decides whether to stop or skip. Problems with the
path itself (missing file, unsupported extension) raise `DataError` at once.

Where a row is located, per file type:
- `.jsonl` / `.ndjson`: the physical line (blank lines are not data and are skipped).
- `.json`: a JSON array of objects; each item is located by the line it starts on. A `.json`
  file that does not start with `[` is read as JSON Lines (a common mislabelling).
- `.csv`: the physical line the record starts on, the header being line 1.
- `.parquet`: the row number (1-based), shown as `file:row N`.
- `.txt`: the whole file is one `{"text": ...}` row (line 1) unless it is larger than
  `TXT_SPLIT_BYTES`; then each blank-line-separated paragraph is a row at its first line.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import type_name
from tunesmith.data.limits import TooDeep, loads_bounded, too_deep_reason

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
TXT_SPLIT_BYTES = 4 * 1024 * 1024
"""A `.txt` file larger than this is split into paragraphs instead of being one sample."""

# csv refuses fields over 128 KiB by default; data fields are bounded later by the format's limit.
_CSV_FIELD_LIMIT = 2**31 - 1
_GLOB_CHARS = re.compile(r"[*?\[]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 bytes into
_BOM = b"\xef\xbb\xbf"
# A JSON string (escapes included) or one bracket: enough to find where a nested value ends.
_JSON_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')

Row = dict[str, Any]
RowResult = tuple[RowRef, "Row | RowIssue"]


def resolve_files(path_or_glob: str, label: str) -> list[Path]:
    """The data files a `path` setting names: one file, every supported file under a directory
    (sorted, hidden entries skipped), or the supported files a glob pattern matches (sorted)."""
    where = f"{label}.path"
    expanded = os.path.expanduser(path_or_glob)
    path = Path(expanded)
    if path.is_file():
        _check_extension(path, where)
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_data_file(p, root=path))
        if not files:
            raise DataError(f"{where}: no data files in directory {path_or_glob} ({_supported()})")
        return files
    if _GLOB_CHARS.search(expanded):
        matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True))
        files = [p for p in matches if _is_data_file(p)]
        if not files:
            what = "no files match" if not matches else "no supported data files match"
            raise DataError(f"{where}: {what} {path_or_glob} ({_supported()})")
        return files
    raise DataError(f"{where}: file not found: {path_or_glob}")


def iter_rows(path_or_glob: str, label: str) -> Iterator[RowResult]:
    """All rows of all files a path names, in order. Path problems raise now, not on first use."""
    files = resolve_files(path_or_glob, label)
    return _chain(iter_file_rows(f, label) for f in files)


def iter_file_rows(path: Path, label: str = "data") -> Iterator[RowResult]:
    """The rows of one file; the reader is chosen by extension."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        _check_extension(path, f"{label}.path")  # raises
        return
    try:
        yield from reader(path, str(path))
    except OSError as e:
        raise DataError(f"{label}.path: cannot read {path}: {e.strerror or e}") from e


def _chain(parts: Iterable[Iterator[RowResult]]) -> Iterator[RowResult]:
    for part in parts:
        yield from part


def _supported() -> str:
    return "supported: " + ", ".join(SUPPORTED_EXTENSIONS)


def _check_extension(path: Path, where: str) -> None:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        shown = f'"{suffix}"' if suffix else "(none)"
        raise DataError(f"{where}: unsupported file type {shown}: {path} ({_supported()})")


def _is_data_file(path: Path, root: Path | None = None) -> bool:
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    if any(p.startswith(".") for p in parts):
        return False
    return path.is_file() and path.suffix.lower() in _READERS


# --- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(path: Path, name: str) -> Iterator[RowResult]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            ref = RowRef(name, lineno)
            yield ref, parse_json_line(raw, ref)


def parse_json_line(raw: bytes, ref: RowRef) -> Row | RowIssue:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowIssue(ref, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
    text = text.rstrip("\r\n")
    try:
        value = loads_bounded(text)
    except TooDeep as e:
        return RowIssue(ref, str(e))
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        truncated = " (line truncated?)" if cut else ""
        return RowIssue(ref, f"invalid JSON: {_json_msg(e, f'column {e.pos + 1}')}{truncated}")
    return _as_object(value, ref, "row")


def _json_msg(e: json.JSONDecodeError, where: str) -> str:
    """json's message with our own location ("Expecting value at column 5")."""
    msg = e.msg if e.msg.endswith(" at") else e.msg + " at"
    return f"{msg} {where}"


def _as_object(value: Any, ref: RowRef, what: str) -> Row | RowIssue:
    if isinstance(value, dict):
        return value
    return RowIssue(ref, f"{what} is {type_name(value)}, expected a JSON object")


# --- JSON array ---------------------------------------------------------------------------------


def _read_json(path: Path, name: str) -> Iterator[RowResult]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    # Invalid bytes become lone surrogates, so one bad string spoils one item, not the file.
    text = data.decode("utf-8", errors="surrogateescape")
    start = _JSON_WS.match(text).end()
    if text[start : start + 1] != "[":
        yield from _read_jsonl(path, name)
        return
    yield from _iter_json_array(text, start + 1, name)


def _iter_json_array(text: str, idx: int, name: str) -> Iterator[RowResult]:
    """Decode the items of a JSON array one by one, tracking the line each starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    idx = _JSON_WS.match(text, idx).end()
    if text.startswith("]", idx):
        yield from _after_array(text, idx + 1, name)
        return
    item = 0
    while True:
        line += text.count("\n", counted, idx)
        counted = idx
        item += 1
        ref = RowRef(name, line)
        result, end = _decode_item(decoder, text, idx, item, ref)
        yield ref, result
        if end is None:
            return
        idx = _JSON_WS.match(text, end).end()
        sep = text[idx : idx + 1]
        if sep == ",":
            idx = _JSON_WS.match(text, idx + 1).end()
            continue
        if sep == "]":
            yield from _after_array(text, idx + 1, name)
            return
        line += text.count("\n", counted, idx)
        ref = RowRef(name, line)
        found = "end of file" if not sep else repr(sep)
        yield ref, RowIssue(ref, f"invalid JSON: expected ',' or ']' after item {item}, found {found}")
        return


def _decode_item(
    decoder: json.JSONDecoder, text: str, idx: int, item: int, ref: RowRef
) -> tuple[Row | RowIssue, int | None]:
    """One array item and where it ends; end None: the rest of the file cannot be read."""
    try:
        value, end = decoder.raw_decode(text, idx)
    except RecursionError:
        end = _value_end(text, idx)
        tail = "" if end is not None else " (rest of the file not read)"
        return RowIssue(ref, too_deep_reason() + tail), end
    except json.JSONDecodeError as e:
        reason = f"invalid JSON in item {item}: {_json_msg(e, f'line {e.lineno} column {e.colno}')}"
        return RowIssue(ref, reason + " (rest of the file not read)"), None
    bad = _BAD_BYTE.search(text, idx, end)
    if bad:
        return RowIssue(ref, f"invalid UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x}"), end
    return _as_object(value, ref, f"item {item}"), end


def _value_end(text: str, idx: int) -> int | None:
    """Where the array or object starting at `idx` ends, found without recursion (None: never)."""
    depth = 0
    for match in _JSON_STRUCTURE.finditer(text, idx):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def _after_array(text: str, idx: int, name: str) -> Iterator[RowResult]:
    idx = _JSON_WS.match(text, idx).end()
    if idx < len(text):
        ref = RowRef(name, 1 + text.count("\n", 0, idx))
        yield ref, RowIssue(ref, "invalid JSON: unexpected data after the closing ']' (not read)")


# --- CSV ----------------------------------------------------------------------------------------


def _read_csv(path: Path, name: str) -> Iterator[RowResult]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    with path.open("rb") as f:
        lines = (raw.decode("utf-8", errors="surrogateescape") for raw in f)
        reader = csv.reader(lines)
        header = _csv_header(reader, name)
        if isinstance(header, tuple):
            yield header
            return
        if header is not None:
            yield from _csv_records(reader, header, name)


def _csv_header(reader: Any, name: str) -> list[str] | RowResult | None:
    """The column names; an issue if the header cannot be used; None for an empty file."""
    ref = RowRef(name, 1)
    try:
        header = next(reader, None)
    except csv.Error as e:
        return ref, RowIssue(ref, f"invalid CSV header: {e} (file not read)")
    if header is None:
        return None
    if header and header[0].startswith("\ufeff"):
        header[0] = header[0][1:]
    if any(_BAD_BYTE.search(h) for h in header):
        return ref, RowIssue(ref, "invalid UTF-8 in the CSV header (file not read)")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        return ref, RowIssue(ref, f"duplicate CSV column {dupes[0]!r} in the header (file not read)")
    return header


def _csv_records(reader: Any, header: list[str], name: str) -> Iterator[RowResult]:
    done = reader.line_num  # lines consumed so far: a record starts on the next one
    while True:
        try:
            record = next(reader, None)
        except csv.Error as e:
            ref = RowRef(name, done + 1)
            yield ref, RowIssue(ref, f"invalid CSV: {e}")
            if reader.line_num == done:
                return
            done = reader.line_num
            continue
        if record is None:
            return
        ref = RowRef(name, done + 1)
        done = reader.line_num
        if record:  # an empty line is not a record
            yield ref, _csv_row(record, header, ref)


def _csv_row(record: list[str], header: list[str], ref: RowRef) -> Row | RowIssue:
    if len(record) != len(header):
        reason = f"CSV row has {len(record)} fields but the header has {len(header)}"
        if len(record) < len(header):
            reason += f" (missing: {', '.join(header[len(record) :])})"
        return RowIssue(ref, reason)
    for column, value in zip(header, record, strict=True):
        bad = _BAD_BYTE.search(value)
        if bad:
            byte = ord(bad.group()) - 0xDC00
            return RowIssue(ref, f"invalid UTF-8: byte 0x{byte:02x} in column {column!r}")
    return dict(zip(header, record, strict=True))


# --- Parquet ------------------------------------------------------------------------------------


def _read_parquet(path: Path, name: str) -> Iterator[RowResult]:
    import pyarrow as pa  # imported here: reading other formats must not pay for it
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for value in batch.to_pylist():
                row += 1
                yield RowRef(name, row, "row"), value
    except (OSError, pa.ArrowException) as e:
        ref = RowRef(name, row + 1, "row")
        yield ref, RowIssue(ref, f"cannot read parquet: {e} (rest of the file not read)")


# --- Plain text ---------------------------------------------------------------------------------


def _read_txt(path: Path, name: str) -> Iterator[RowResult]:
    if path.stat().st_size > TXT_SPLIT_BYTES:
        yield from _txt_paragraphs(path, name)
        return
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if not data.strip():
        return
    ref = RowRef(name, 1)
    try:
        yield ref, {"text": data.decode("utf-8")}
    except UnicodeDecodeError as e:
        line = 1 + data.count(b"\n", 0, e.start)
        yield ref, RowIssue(ref, f"invalid UTF-8: byte 0x{data[e.start]:02x} at line {line}")


def _txt_paragraphs(path: Path, name: str) -> Iterator[RowResult]:
    """Blank-line-separated paragraphs of a large text file, each at the line it starts on."""
    para: list[bytes] = []
    start = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.strip():
                if not para:
                    start = lineno
                para.append(raw)
            elif para:
                yield _txt_paragraph(para, RowRef(name, start))
                para = []
    if para:
        yield _txt_paragraph(para, RowRef(name, start))


def _txt_paragraph(lines: list[bytes], ref: RowRef) -> RowResult:
    for offset, raw in enumerate(lines):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8: byte 0x{raw[e.start]:02x} at line {ref.line + offset}"
            return ref, RowIssue(ref, reason)
    text = b"".join(lines).decode("utf-8").rstrip("\r\n")
    return ref, {"text": text}


_READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
