"""Uploaded training files: stored under generated ids, validated with the project's own data checks.

The client's filename is kept only as a label; the bytes go to `files/<id>.jsonl` under the storage
root, so no name a client sends can reach the file system. A file is UTF-8 JSONL; every row is read
the way `tunesmith train` (and `tunesmith data check`) reads it, as conversations or, when the rows
are preference pairs, as pairs. Its status is `processed` when every row is good, else `error` with
the bad lines named in `status_details`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.validate import read_samples
from tunesmith.jobs.store import Store, new_id, now

PURPOSES = ("fine-tune",)
DEFAULT_MAX_FILE_BYTES = 64 << 20
MIN_EXAMPLES = 10
"""Fewest good examples a training file must hold (OpenAI's rule too): fewer cannot teach anything."""
SHOWN_ISSUES = 10


class FileRefused(ValueError):
    """An upload the service will not store (wrong purpose, empty, too large); the message says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Checked:
    status: str  # processed | error
    details: str | None
    kind: str | None  # conversations | pairs
    examples: int


def files_dir(root: Path) -> Path:
    return Path(root) / "files"


def save_upload(
    store: Store, filename: str, data: bytes, purpose: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> dict[str, Any]:
    """Store and validate one upload; the row as saved in the database."""
    if purpose not in PURPOSES:
        raise FileRefused(
            f"purpose {purpose!r} is not supported here; this server accepts: {', '.join(PURPOSES)}",
            "purpose",
        )
    if not data:
        raise FileRefused("the uploaded file is empty", "file")
    if len(data) > max_bytes:
        raise FileRefused(f"the file is {len(data)} bytes; this server's limit is {max_bytes} bytes", "file")
    file_id = new_id("file-")
    folder = files_dir(store.root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    checked = check_file(path, data)
    label = Path(filename or "upload.jsonl").name[:255] or "upload.jsonl"
    return store.insert(
        "files",
        {
            "id": file_id,
            "created_at": now(),
            "filename": label,
            "purpose": purpose,
            "bytes": len(data),
            "status": checked.status,
            "status_details": checked.details,
            "kind": checked.kind,
            "examples": checked.examples,
            "path": str(path),
        },
    )


def check_file(path: Path, data: bytes | None = None) -> Checked:
    """Every row checked as training reads it; the bad ones named by line."""
    raw = data if data is not None else path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return Checked(
            "error", f"line {line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8", None, 0
        )
    kind = "conversations"
    try:
        result = read_samples(str(path), on_error="skip", label="file")
    except DataError as exc:
        if "preference" not in str(exc):
            return Checked("error", _unpathed(str(exc), path), None, 0)
        kind = "pairs"
        try:
            result = read_samples(str(path), on_error="skip", label="file", pairs=True)
        except DataError as again:
            return Checked("error", _unpathed(str(again), path), None, 0)
    examples = len(result.samples)
    if result.issues:
        return Checked("error", describe_issues(result.issues, path), kind, examples)
    if examples == 0:
        return Checked("error", "the file holds no examples", kind, 0)
    return Checked("processed", None, kind, examples)


def describe_issues(issues: list[RowIssue], path: Path) -> str:
    shown = [f"line {issue.ref.line}: {_unpathed(issue.reason, path)}" for issue in issues[:SHOWN_ISSUES]]
    more = len(issues) - len(shown)
    tail = f"; and {more} more bad lines" if more > 0 else ""
    return f"{len(issues)} bad line(s): " + "; ".join(shown) + tail


def _unpathed(message: str, path: Path) -> str:
    """Messages name the stored path; the client knows its file by id, not by our storage layout."""
    return message.replace(str(path), "the file")


def delete_file(store: Store, file_id: str) -> bool:
    row = store.get("files", file_id)
    if row is None:
        return False
    Path(row["path"]).unlink(missing_ok=True)
    return store.delete("files", file_id)
