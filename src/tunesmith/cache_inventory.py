"""What the project keeps under its cache root, and clearing it: `tunesmith cache`.

Areas: `models` (GGUF files converted once to safetensors), `tokenizers`, `data` (tokenized sources,
bounded by `$TUNESMITH_DATA_CACHE_MAX`) and `probe` (the measured precision choice). Everything
there is rebuilt on demand, so clearing loses time, never work.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

AREAS = ("models", "tokenizers", "data", "probe")
BUSY_SECONDS = 3600
"""A conversion or write begun less than this long ago may still be running: clear leaves it."""


@dataclass
class Area:
    name: str
    path: Path
    entries: int
    bytes: int


def areas() -> list[Area]:
    from tunesmith.models.gguf_cache import cache_root

    root = cache_root()
    return [_measure(name, root / name) for name in AREAS]


def clear(names: list[str]) -> list[Area]:
    """Delete the named areas' entries; return what each held. Unknown names raise ValueError."""
    unknown = [n for n in names if n not in AREAS]
    if unknown:
        raise ValueError(f"unknown cache area {unknown[0]!r}; the areas are {', '.join(AREAS)}")
    cleared = []
    for area in areas():
        if area.name not in names or not area.path.is_dir():
            continue
        cleared.append(area)
        for entry in area.path.iterdir():
            if _busy(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return cleared


def _measure(name: str, path: Path) -> Area:
    if not path.is_dir():
        return Area(name, path, 0, 0)
    listed = list(path.iterdir())
    total = sum(_tree_bytes(entry) for entry in listed)
    return Area(name, path, len(listed), total)


def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except FileNotFoundError:
            return 0
    return sum(_tree_bytes(child) for child in path.iterdir())


def _busy(entry: Path) -> bool:
    """Half-written entries (`.converting-*` folders, `*.partial` files) that may belong to a live process."""
    if not (entry.name.startswith(".converting-") or entry.name.endswith(".partial")):
        return False
    try:
        return time.time() - entry.stat().st_mtime < BUSY_SECONDS
    except FileNotFoundError:
        return False
