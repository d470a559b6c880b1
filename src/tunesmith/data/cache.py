"""On-disk cache of one source's tokenized samples, so a second run skips reading and tokenizing.

An entry is keyed by everything that changes its tokens: each data file's path, size and
modification time, the source's path setting and format, the tokenizer (a hash of its full
serialised form and special tokens), the chat template text, the tokenize settings, `on_error`
and a format version. Any change gives a new key, so an entry is never stale, only unused.

The folder is bounded: reading an entry marks it used (its modification time), and after each
write the least recently used entries go until the folder fits `$TUNESMITH_DATA_CACHE_MAX`
(default 20GB; `0` keeps nothing but the entry just written). `tunesmith cache` lists and clears it.

Entries are safetensors files (flat arrays plus a JSON header; no pickle), written to a
temporary name and renamed, so an interrupted write never leaves a half entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.batch_tokenize import TokenizeSettings
from tunesmith.data.block import TokenBlock
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import RowIssue

CACHE_VERSION = 2
"""Bump when tokenization or the entry layout changes: old entries are then simply not found."""
CACHE_MIN_BYTES = 64 * 1024
"""Sources smaller than this are not cached: tokenizing them is as fast as reading an entry."""

DEFAULT_MAX_BYTES = 20 * 1024**3
MAX_BYTES_ENV = "TUNESMITH_DATA_CACHE_MAX"

_ARRAYS = ("ids", "trained", "offsets", "truncated", "file_index", "lines")


@dataclass
class CachedSource:
    """What one source gave after reading and tokenizing: samples plus what its report needs."""

    block: TokenBlock
    rows_read: int
    truncated: int
    skipped: list[RowIssue]
    dropped: list[RowIssue]


def cache_dir() -> Path:
    from tunesmith.models.gguf_cache import cache_root

    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce other ids."""
    from tunesmith.data.tokenize import bos_token_id

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos": tokenizer.eos_token_id,
        "bos": bos_token_id(tokenizer),
        "size": len(tokenizer),
    }
    digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def source_key(
    path_setting: str,
    files: list[Path],
    fmt: str,
    tokenizer_id: str,
    template: str | None,
    settings: TokenizeSettings,
    on_error: str,
) -> str:
    stats = []
    for file in files:
        stat = file.stat()
        stats.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    parts = {
        "version": CACHE_VERSION,
        "path": path_setting,
        "files": stats,
        "format": fmt,
        "tokenizer": tokenizer_id,
        "template": hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
        "settings": asdict(settings),
        "on_error": on_error,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def worth_caching(files: list[Path]) -> bool:
    return sum(f.stat().st_size for f in files) >= CACHE_MIN_BYTES


def load(key: str) -> CachedSource | None:
    """The entry for `key`, or None if there is none (or it cannot be read: it is rebuilt)."""
    from safetensors import SafetensorError, safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = json.loads(handle.metadata()["meta"])
            arrays = {name: handle.get_tensor(name) for name in _ARRAYS}
    except (OSError, KeyError, ValueError, SafetensorError):
        return None
    block = TokenBlock(**arrays, files=[(f, u) for f, u in meta["files"]])
    _mark_used(path)
    return CachedSource(
        block=block,
        rows_read=meta["rows_read"],
        truncated=meta["truncated"],
        skipped=[_issue(i) for i in meta["skipped"]],
        dropped=[_issue(i) for i in meta["dropped"]],
    )


def save(key: str, entry: CachedSource) -> Path:
    from safetensors.numpy import save_file

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    block = entry.block
    meta = {
        "files": block.files,
        "rows_read": entry.rows_read,
        "truncated": entry.truncated,
        "skipped": [_issue_row(i) for i in entry.skipped],
        "dropped": [_issue_row(i) for i in entry.dropped],
    }
    arrays = {name: np.ascontiguousarray(getattr(block, name)) for name in _ARRAYS}
    path = folder / f"{key}.safetensors"
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(arrays, str(partial), metadata={"meta": json.dumps(meta)})
    os.replace(partial, path)
    evict_to(max_bytes(), keep=path)
    return path


def max_bytes() -> int:
    """The folder's cap: `$TUNESMITH_DATA_CACHE_MAX` ("5GB", "500MB", bytes), else 20GB."""
    from tunesmith.config.load import ConfigError
    from tunesmith.sizes import parse_size

    text = os.environ.get(MAX_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{MAX_BYTES_ENV}: {exc}") from None


def entries() -> list[Path]:
    """The cache's entries, least recently used first."""
    folder = cache_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.safetensors"):
        try:
            found.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
    return [path for _, path in sorted(found)]


def evict_to(limit: int, keep: Path | None = None) -> list[Path]:
    """Delete least recently used entries until the folder holds at most `limit` bytes.

    `keep` (the entry just written) stays even when it alone exceeds the limit: the run that wrote it
    reads it next time. Returns the deleted paths."""
    listed = entries()
    sizes = {path: _size(path) for path in listed}
    total = sum(sizes.values())
    removed = []
    for path in listed:
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= sizes[path]
        removed.append(path)
    return removed


def _mark_used(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves its entries
        os.utime(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _issue_row(issue: RowIssue) -> list[Any]:
    return [issue.ref.file, issue.ref.line, issue.ref.unit, issue.reason]


def _issue(row: list[Any]) -> RowIssue:
    file, line, unit, reason = row
    return RowIssue(RowRef(file, line, unit), reason)
