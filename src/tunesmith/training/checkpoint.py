"""Atomic, durable checkpoints and exact resume.

A checkpoint is written into a hidden staging directory, every file is fsynced, and it becomes
visible by one rename; `state.json` is written last inside it, so a directory without it is never
trusted. Only trainable parameters are stored (the frozen base is reloaded from the model source).
Weights are checked to be finite before anything is committed, and a committed checkpoint is
never removed before its successor is committed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.training.durable import commit_dir, free_bytes, human_bytes, write_text_atomic
from tunesmith.training.errors import RunDirError

STATE_FILE = "state.json"
FINGERPRINT_FILE = "fingerprint.json"
HISTORY_FILE = "history.jsonl"
"""One line per committed checkpoint, appended at its commit and kept when the checkpoint is pruned."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int
    micro_batches_done: int
    tokens_seen: int
    trained_tokens_seen: int
    scheduler: dict[str, Any]
    data: dict[str, Any] = field(
        default_factory=dict
    )  # the batch stream's position, when it needs more than step
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16 loss scaling
    overflow_steps: int = 0  # fp16 steps skipped because the gradients overflowed


class NonFiniteWeights(ValueError):
    """Trainable weights hold NaN or Inf: such a state must never become a checkpoint."""


class CheckpointWriteError(RunDirError):
    pass


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def non_finite_count(tensors: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """How many values are NaN/Inf, and the first few tensors holding them."""
    total, names = 0, []
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            total += bad
            names.append(name)
    return total, names[:3]


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad, names = non_finite_count(tensors)
    if bad:
        raise NonFiniteWeights(f"{what} holds {bad:,} NaN/Inf values (in {', '.join(names)}, ...)")


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for per_param in optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep: int | None,
    fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Write, fsync and commit the checkpoint for `state.step`; returns its directory.

    Raises NonFiniteWeights (nothing written) when the weights are not finite, and
    CheckpointWriteError (staging removed, with the space a checkpoint needs) when writing fails.
    """
    weights = trainable_state(model)
    check_finite(weights, f"the model after step {state.step}")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:08d}"
    if (final / STATE_FILE).is_file():
        return final  # this step is already committed; the state is the same, so is the content
    staging = folder / f".step-{state.step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        save_file(weights, staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        save_file(_rng_state(), staging / "rng.safetensors")
        if fingerprint is not None:
            (staging / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1), encoding="utf-8")
        write_text_atomic(staging / STATE_FILE, json.dumps(asdict(state), indent=1))
        commit_dir(staging, final)
    except Exception as exc:  # disk full surfaces as OSError, RuntimeError (torch) or SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for t in weights.values()) + _optimizer_bytes(optimizer)
        raise CheckpointWriteError(_write_failure(final, exc, needed, free_bytes(folder))) from exc
    with open(folder / HISTORY_FILE, "a", encoding="utf-8") as history:
        history.write(json.dumps({"step": state.step, "dir": final.name}) + "\n")
    if keep:
        for old in committed_checkpoints(folder)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(final: Path, exc: BaseException, needed: int, free: int | None) -> str:
    disk_full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < needed)
    if disk_full:
        left = f"; {human_bytes(free)} free" if free is not None else ""
        return (
            f"no space left to write checkpoint {final}: a checkpoint of this run needs about "
            f"{human_bytes(needed)}{left}. The partial checkpoint was removed; free some space (or lower "
            "train.save_total_limit) and resume with --resume"
        )
    return f"could not write checkpoint {final}: {exc}. The partial checkpoint was removed"


def checkpoint_history(folder: Path) -> list[Path]:
    """Every checkpoint ever committed in `folder`, oldest first, pruned ones included (their
    directories may be gone): a watcher that lists the folder now and then would miss a checkpoint
    pruned between two looks."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return []
    steps: dict[int, Path] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            steps[int(record["step"])] = folder / str(record["dir"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-append
    return [steps[step] for step in sorted(steps)]


def committed_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (no state.json) are ignored."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


@dataclass
class LoadedCheckpoint:
    """Everything a checkpoint holds, read and validated before any of it touches the run."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: TrainerState
    fingerprint: dict[str, Any] | None


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read every file of a checkpoint; raises ValueError/OSError/RuntimeError when any is unusable."""
    weights = load_file(path / "trainable.safetensors")
    check_finite(weights, f"checkpoint {path}")
    optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = load_file(path / "rng.safetensors")
    state = TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    fingerprint_path = path / FINGERPRINT_FILE
    fingerprint = (
        json.loads(fingerprint_path.read_text(encoding="utf-8")) if fingerprint_path.is_file() else None
    )
    return LoadedCheckpoint(path, weights, optimizer, rng, state, fingerprint)


def apply_checkpoint(loaded: LoadedCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in loaded.weights]
    unknown = [n for n in loaded.weights if n not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {loaded.path} does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unknown {unknown[:3]}); was the adapter config changed?"
        )
    with torch.no_grad():
        for name, tensor in loaded.weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(loaded.optimizer)
    _set_rng_state(loaded.rng)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    loaded = read_checkpoint(path)
    apply_checkpoint(loaded, model, optimizer)
    return loaded.state


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    """Checkpoints to try, newest first: `never` -> none; `auto` -> every committed one; else the path."""
    if resume == "never":
        return []
    if resume == "auto":
        return committed_checkpoints(run_dir / "checkpoints")[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return [path]


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The newest candidate (what resume tries first), or None."""
    found = resume_candidates(run_dir, resume)
    return found[0] if found else None


def set_aside(path: Path, reason: str) -> Path:
    """Rename an unusable checkpoint so that no later resume picks it (kept for inspection)."""
    target = path.with_name(f"{path.name}.{reason}")
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target
