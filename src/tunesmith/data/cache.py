"""On-disk cache of one source's tokenized samples, so a second run skips reading and tokenizing.

An entry is keyed by everything that changes its tokens: each data file's path, size and
modification time, the source's path setting and format, the tokenizer (a hash of its full
serialised form and special tokens), the chat template text, the tokenize settings, `on_error`
and a format version. Any change gives a new key, so an entry is never stale, only unused
(delete `<cache root>/data/` to reclaim the space).

Entries are safetensors files (flat arrays plus a JSON header; no pickle), written to a
temporary name and renamed, so an interrupted write never leaves a half entry.
"""

from __future__ import annotations

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
    return path


def _issue_row(issue: RowIssue) -> list[Any]:
    return [issue.ref.file, issue.ref.line, issue.ref.unit, issue.reason]


def _issue(row: list[Any]) -> RowIssue:
    file, line, unit, reason = row
    return RowIssue(RowRef(file, line, unit), reason)
