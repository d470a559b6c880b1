"""The web UI's Export page: a finished job's run exported by `tunesmith export`, in a child process.

Each export is a record file under `<storage>/exports/<job id>/<export id>.json` (kind, output path,
status, the command's output with the behaviour check's summary), written when it starts and when it
ends, so a reload or a restarted server shows the same list. A record still `running` whose process
is gone reads as `interrupted`. The check's verdict is the command's exit status: 0 passed (or
skipped), 1 the export does not behave like the trained model, anything else an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tunesmith.jobs.store import new_id

KINDS = ("merge", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
OUTPUT_CHARS = 6000


class ExportRefused(ValueError):
    pass


def exports_dir(root: Path, job_id: str) -> Path:
    return root / "exports" / job_id


def list_exports(root: Path, job_id: str) -> list[dict[str, Any]]:
    folder = exports_dir(root, job_id)
    records = []
    for path in sorted(folder.glob("export-*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("status") == "running" and not _alive(record.get("pid")):
            record["status"] = "interrupted"
        records.append(record)
    return sorted(records, key=lambda r: r.get("created_at", 0), reverse=True)


def start_export(
    root: Path, job: dict[str, Any], kind: str, gguf_type: str = "f16", verify: bool = True
) -> dict[str, Any]:
    """Start exporting a succeeded job's run; the record as it starts."""
    if job["status"] != "succeeded":
        raise ExportRefused(f"job {job['id']} is {job['status']}; only a succeeded job's run can be exported")
    if kind not in KINDS:
        raise ExportRefused(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "gguf" and gguf_type not in GGUF_TYPES:
        raise ExportRefused(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if any(record["status"] == "running" for record in list_exports(root, job["id"])):
        raise ExportRefused(f"an export of job {job['id']} is still running; wait for it to finish")
    export_id = new_id("export-")
    folder = exports_dir(root, job["id"])
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (f"{export_id}.gguf" if kind == "gguf" else f"{export_id}-merged")
    command = [sys.executable, "-m", "tunesmith", "export", job["run_dir"], "--out", str(out)]
    command += ["--merge"] if kind == "merge" else ["--gguf", gguf_type]
    if not verify:
        command.append("--no-verify")
    record: dict[str, Any] = {
        "id": export_id,
        "job_id": job["id"],
        "kind": kind,
        "gguf_type": gguf_type if kind == "gguf" else None,
        "verify": verify,
        "out": str(out),
        "created_at": int(time.time()),
        "status": "running",
        "check": None,
        "output": "",
    }
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    record["pid"] = process.pid
    path = folder / f"{export_id}.json"
    _write(path, record)
    threading.Thread(
        target=_wait, args=(process, record, path), name=f"tunesmith-{export_id}", daemon=True
    ).start()
    return record


def _wait(process: subprocess.Popen[bytes], record: dict[str, Any], path: Path) -> None:
    output, _ = process.communicate()
    text = output.decode("utf-8", "replace")
    code = process.returncode
    record.update(
        status="succeeded" if code == 0 else "failed",
        returncode=code,
        finished_at=int(time.time()),
        output=text[-OUTPUT_CHARS:],
        check=_verdict(code, text, record["verify"]),
        pid=None,
    )
    _write(path, record)


def _verdict(code: int, text: str, verify: bool) -> str:
    if code == 0:
        return "passed" if verify else "skipped"
    return "failed" if code == 1 and "does not behave like" in text else "error"


def _write(path: Path, record: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
