"""Finished chunks on disk, keyed by (document hash, chunk index, prompt hash); written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


class ChunkCache:
    """One JSON file per finished chunk; a file is only ever whole (temp file + os.replace)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, doc_hash: str, index: int, prompt_hash: str) -> Path:
        return self.root / f"{digest(doc_hash, str(index), prompt_hash)[:32]}.json"

    def get(self, doc_hash: str, index: int, prompt_hash: str) -> dict[str, Any] | None:
        path = self._path(doc_hash, index, prompt_hash)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, doc_hash: str, index: int, prompt_hash: str, value: dict[str, Any]) -> None:
        path = self._path(doc_hash, index, prompt_hash)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False)
        os.replace(tmp, path)
