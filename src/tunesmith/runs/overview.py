"""`tunesmith runs [DIR]`: what every run under a folder did, read from its files alone.

No tracker needed: config.yaml, metrics.jsonl, status.json, run.json and checkpoints/ hold it all.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.metrics import read_metrics
from tunesmith.training.run_dir import RUN_INFO, STATUS_FILE, read_status

SEARCH_DEPTH = 3
"""Folder levels below DIR searched for runs (runs/<group>/<name> is two)."""
_SKIP = {"checkpoints", "adapter", "model", ".git", "node_modules", "__pycache__"}


@dataclass
class RunSummary:
    path: str
    status: str
    reason: str | None
    steps: int | None
    last_eval_loss: float | None
    best_eval_loss: float | None
    best_eval_step: int | None
    last_train_loss: float | None
    tokens_per_s: float | None
    duration_s: float | None
    method: str | None
    adapter: str | None
    model: str | None
    checkpoints: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("metrics.jsonl", STATUS_FILE, RUN_INFO)
    )


def find_runs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Run directories at `root` or up to `depth` levels below it, sorted by path; never inside a run."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    if depth <= 0 or not root.is_dir():
        return found
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in _SKIP)
    except OSError:
        return found
    for child in children:
        found.extend(find_runs(child, depth - 1))
    return found


def summarize_run(run_dir: Path) -> RunSummary:
    config = _read_config(run_dir)
    status = read_status(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if isinstance(r.get("eval_loss"), int | float) and math.isfinite(r["eval_loss"])]
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    last = train_rows[-1] if train_rows else None
    steps = max((int(r["step"]) for r in rows if "step" in r), default=None)
    if steps is None and isinstance(status.get("steps"), int):
        steps = status["steps"]
    return RunSummary(
        path=str(run_dir),
        status=status.get("status", "unknown"),
        reason=status.get("reason"),
        steps=steps,
        last_eval_loss=evals[-1]["eval_loss"] if evals else None,
        best_eval_loss=best["eval_loss"] if best else None,
        best_eval_step=best.get("step") if best else None,
        last_train_loss=last["loss"] if last else None,
        tokens_per_s=last.get("tokens_per_s") if last else None,
        duration_s=_duration(status, last),
        method=config.get("method"),
        adapter=_adapter(config.get("adapter")),
        model=config.get("model"),
        checkpoints=len(committed_checkpoints(run_dir / "checkpoints")),
    )


def overview(root: Path, depth: int = SEARCH_DEPTH) -> list[RunSummary]:
    return [summarize_run(run) for run in find_runs(root, depth)]


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _adapter(section: Any) -> str | None:
    if not isinstance(section, dict):
        return None
    kind = section.get("type")
    if kind in ("lora", "qlora") and section.get("r") is not None:
        return f"{kind} r{section['r']}"
    return kind


def _duration(status: dict[str, Any], last_row: dict[str, Any] | None) -> float | None:
    """Wall time from the status (start to end, or to now while running), else the last row's elapsed_s."""
    if isinstance(status.get("duration_s"), int | float):
        return float(status["duration_s"])
    if status.get("status") == "running" and not status.get("stale") and "started" in status:
        return round(time.time() - float(status["started"]), 3)
    if last_row and isinstance(last_row.get("elapsed_s"), int | float):
        return float(last_row["elapsed_s"])
    return None


# -- the table ---------------------------------------------------------------------------------------

COLUMNS = (
    "run",
    "status",
    "steps",
    "eval loss",
    "best eval",
    "tok/s",
    "duration",
    "method",
    "adapter",
    "model",
)


def table_rows(runs: list[RunSummary], root: Path) -> list[list[str]]:
    rows = []
    for run in runs:
        rows.append(
            [
                _relative(Path(run.path), root),
                run.status,
                _num(run.steps, "{}"),
                _num(run.last_eval_loss, "{:.4f}"),
                _num(run.best_eval_loss, "{:.4f}")
                + (f" @{run.best_eval_step}" if run.best_eval_step is not None else ""),
                _num(run.tokens_per_s, "{:.0f}"),
                format_duration(run.duration_s),
                run.method or "-",
                run.adapter or "-",
                _short_model(run.model),
            ]
        )
    return rows


def format_table(runs: list[RunSummary], root: Path) -> str:
    """A plain, aligned text table, then one line per failed run with its reason."""
    rows = [list(COLUMNS), *table_rows(runs, root)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    for run in runs:
        if run.reason and run.status in ("failed", "interrupted"):
            lines.append(f"{_relative(Path(run.path), root)}: {run.status}: {run.reason}")
    return "\n".join(lines)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _relative(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else path.name or str(path)


def _short_model(model: str | None) -> str:
    """A model path shortened to its last folder or file name; specs like `default` stay whole."""
    if not model:
        return "-"
    return Path(model).name if "/" in model.rstrip("/") else model
