"""Writes that survive a crash or a power loss: fsync before every commit rename.

A rename is atomic, but without fsync the data it points to may still sit in the page cache, so a
power loss can leave a committed name over empty files. Everything that becomes visible by a
rename (checkpoints, the final model, run.json) goes through these helpers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Persist a directory's entries (new names, renames); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then every directory, deepest first."""
    dirs = [folder]
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
        elif path.is_dir():
            dirs.append(path)
    for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def commit_dir(staging: Path, final: Path) -> None:
    """Make a complete, fsynced `staging` directory visible as `final`.

    An existing `final` is moved aside and deleted only after the new one is in place: a crash in
    between leaves the old contents under `.NAME.old`, never a half-written `final`.
    """
    fsync_tree(staging)
    parent = final.parent
    aside = parent / f".{final.name}.old"
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
