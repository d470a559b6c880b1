"""What a resumed run may change, decided per config key, and the fingerprint that tells.

Each checkpoint stores the resolved config and a fingerprint of the training data. On resume the
new config is compared with it key by key:

- keys that only steer the rest of the run (learning rate and its schedule, how long to train,
  save/eval/log cadence, clipping) are applied and announced;
- keys with no effect on the numbers (speed and memory options, output handling) are accepted;
- everything else (model, adapter, method, data and its shape, batch size, accumulation, seeds,
  precision) would silently break exact resume, so it is refused with the key named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunesmith.config.schema import RunConfig
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.training.errors import ResumeMismatch

APPLIED_ON_RESUME = (
    "train.lr",
    "train.warmup_ratio",
    "train.scheduler",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.num_cycles",
    "train.wsd_decay_ratio",
    "train.wsd_decay_shape",
    "train.max_steps",
    "train.epochs",
    "train.max_grad_norm",
    "train.save_every",
    "train.eval_every",
    "train.log_every",
    "train.save_total_limit",
)
"""Changes a resume applies from the step it continues at (and reports)."""

NO_EFFECT_ON_NUMBERS = (
    "train.resume",
    "train.compile",
    "train.gradient_checkpointing",
    "train.lean_activations",
    "train.activation_offload",
    "train.loss_chunk_size",
    "train.attention",
    "output.",
    "data.num_proc",
    "data.cache",
    "data.on_error",
    "data.max_dropped_fraction",
    "grpo.log_completions_every",
    "tracking.",
    "eval.",
)
"""Keys (or prefixes ending in '.') that change speed, memory or bookkeeping, never the numbers."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists stay whole values (a changed source list is one key)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _matches(key: str, names: Sequence[str]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


@dataclass
class ResumeChanges:
    applied: list[tuple[str, Any, Any]]  # (key, before, now)
    ignored: list[tuple[str, Any, Any]]

    def describe(self) -> str:
        return "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in self.applied)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def compare_configs(
    saved: dict[str, Any],
    current: RunConfig,
    saved_processes: int | None = None,
    processes: int = 1,
) -> ResumeChanges:
    """Classify every changed key; raise ResumeMismatch naming the keys a resume cannot change.

    A step takes `grad_accum x processes` micro-batches, so a resume on another number of processes
    is exact when that product stays the same (`train.grad_accum` may change to keep it), and refused
    when it would not."""
    before, now = flatten(saved), flatten(current.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    per_step = _micro_batches_per_step(before, now, saved_processes or 1, processes)
    if per_step is not None:
        changed = [k for k in changed if k != "train.grad_accum"]
    applied = [(k, before.get(k), now.get(k)) for k in changed if _matches(k, APPLIED_ON_RESUME)]
    if per_step:
        applied.append(("train.grad_accum x processes", *per_step))
    ignored = [(k, before.get(k), now.get(k)) for k in changed if _matches(k, NO_EFFECT_ON_NUMBERS)]
    refused = [
        k for k in changed if not _matches(k, APPLIED_ON_RESUME) and not _matches(k, NO_EFFECT_ON_NUMBERS)
    ]
    if refused:
        lines = [f"  {k}: {_show(before.get(k))} in the checkpoint, {_show(now.get(k))} now" for k in refused]
        raise ResumeMismatch(
            "cannot resume: these settings differ from the checkpoint's, and a resumed run must keep them "
            "(they decide the model, the data or the batches):\n"
            + "\n".join(lines)
            + "\nSet them back to resume, or start a new run (another output.dir, or output.overwrite=true). "
            f"A resume may change: {', '.join(APPLIED_ON_RESUME)}."
        )
    return ResumeChanges(applied, ignored)


def _micro_batches_per_step(
    before: dict[str, Any], now: dict[str, Any], saved_processes: int, processes: int
) -> tuple[str, str] | None:
    """None when the processes and accumulation did not change; the (before, now) layout when they
    changed and keep the micro-batches per step; ResumeMismatch when they change them."""
    accum_before, accum_now = before.get("train.grad_accum", 1), now.get("train.grad_accum", 1)
    if saved_processes == processes and accum_before == accum_now:
        return None
    if accum_before * saved_processes != accum_now * processes:
        raise ResumeMismatch(
            f"cannot resume: the checkpoint took {accum_before * saved_processes} micro-batches per step "
            f"(train.grad_accum {accum_before} x {saved_processes} processes), this run would take "
            f"{accum_now * processes} (train.grad_accum {accum_now} x {processes} processes). Keep the "
            "product: set train.grad_accum so that grad_accum x processes is "
            f"{accum_before * saved_processes}, or start a new run"
        )
    return f"{accum_before} x {saved_processes}", f"{accum_now} x {processes}"


def samples_fingerprint(samples: Sequence[TokenizedSample]) -> str:
    """A hash of the training samples' tokens and labels in order: equal only for the same data."""
    digest = hashlib.sha256()
    digest.update(str(len(samples)).encode())
    for sample in samples:
        ids = np.asarray(sample.input_ids, dtype=np.int64)
        labels = np.asarray(sample.labels, dtype=np.int64)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
    return digest.hexdigest()


def files_fingerprint(config: RunConfig) -> str:
    """For streamed data (not in memory): each training file's path, size and modification time."""
    from tunesmith.data.sources import resolve_files

    entries = []
    for i, source in enumerate(config.data.train):
        for path in resolve_files(source.path, f"data.train[{i}]"):
            stat = path.stat()
            entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def check_data(saved: dict[str, Any] | None, current: str) -> None:
    if saved is None or saved.get("data") in (None, current):
        return
    raise ResumeMismatch(
        "cannot resume: the training data differs from the data the checkpoint was trained on (a file was "
        "edited, added or removed, or tokenizes differently now). Restore the data to resume, or start a new "
        "run (another output.dir, or output.overwrite=true)"
    )
