"""A job's events and checkpoints, taken from what its run writes to disk.

The run's `metrics.jsonl` is tailed from the byte offset the database remembers (only complete
lines: a line being written is read next time), each line becoming one `metrics` event in OpenAI's
shape (`train_loss`, `valid_loss`, ...). Checkpoints are the committed `checkpoints/step-N`
directories, recorded once each with the metrics of their step, so the list outlives pruning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.jobs.store import Store, new_id, now
from tunesmith.training.checkpoint import checkpoint_history, committed_checkpoints

METRICS_FILE = "metrics.jsonl"
RENAMED = {"loss": "train_loss", "eval_loss": "valid_loss"}


def add_event(
    store: Store,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    store.insert(
        "events",
        {
            "id": new_id("ftevent-"),
            "job_id": job_id,
            "created_at": now(),
            "level": level,
            "message": message,
            "type": type,
            "data": data,
        },
    )


def sync_metrics(store: Store, job: dict[str, Any]) -> None:
    """New complete lines of the run's metrics.jsonl become events; the offset and tokens advance."""
    path = Path(job["run_dir"]) / METRICS_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(job["metrics_offset"])
            chunk = handle.read()
    except FileNotFoundError:
        return
    end = chunk.rfind(b"\n")
    if end < 0:
        return
    trained = job["trained_tokens"]
    for raw in chunk[: end + 1].splitlines():
        record = _parse(raw)
        if record is None:
            continue
        data = metrics_data(record)
        if "trained_tokens" in record:
            trained = int(record["trained_tokens"])
        add_event(store, job["id"], metrics_message(data), type="metrics", data=data)
    store.update("jobs", job["id"], metrics_offset=job["metrics_offset"] + end + 1, trained_tokens=trained)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def metrics_data(record: dict[str, Any]) -> dict[str, Any]:
    """One metrics line in the names OpenAI's events use (`step`, `train_loss`, `valid_loss`, ...)."""
    return {RENAMED.get(key, key): value for key, value in record.items() if isinstance(value, int | float)}


def metrics_message(data: dict[str, Any]) -> str:
    parts = [f"Step {data['step']}"]
    if "train_loss" in data:
        parts.append(f"training loss={data['train_loss']:.4f}")
    if "valid_loss" in data:
        parts.append(f"validation loss={data['valid_loss']:.4f}")
    return ": ".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def sync_checkpoints(store: Store, job: dict[str, Any], model_name: str) -> list[int]:
    """Record committed checkpoints not seen before; their step numbers."""
    run_dir = Path(job["run_dir"])
    folder = run_dir / "checkpoints"
    # The history has the checkpoints pruned since the last look; the listing, runs written before it.
    found = sorted({*checkpoint_history(folder), *committed_checkpoints(folder)}, key=lambda p: p.name)
    if not found:
        return []
    steps = _metrics_by_step(run_dir / METRICS_FILE)
    added = []
    for path in found:
        step = int(path.name.removeprefix("step-"))
        row = {
            "id": new_id("ftckpt-"),
            "job_id": job["id"],
            "created_at": now(),
            "step_number": step,
            "path": str(path),
            "metrics": _checkpoint_metrics(step, steps.get(step, {})),
        }
        if store.insert_ignore("checkpoints", row):
            added.append(step)
            add_event(store, job["id"], f"Checkpoint created at step {step}")
    return added


def _metrics_by_step(path: Path) -> dict[int, dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return by_step
    for raw in lines:
        record = _parse(raw)
        if record is not None:
            by_step.setdefault(int(record["step"]), {}).update(metrics_data(record))
    return by_step


def _checkpoint_metrics(step: int, data: dict[str, Any]) -> dict[str, Any]:
    keys = ("train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy")
    return {"step": float(step), **{key: data[key] for key in keys if key in data}}


def checkpoint_model_name(model_name: str, step: int) -> str:
    return f"{model_name}:ckpt-step-{step}"
