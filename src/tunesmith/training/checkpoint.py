"""Atomic checkpoints and exact resume.

A checkpoint is written into a hidden staging directory and becomes visible by one rename;
`state.json` is written last inside it, so a directory without it is never trusted.
Only trainable parameters are stored (the frozen base is reloaded from the model source).
"""

from __future__ import annotations

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

STATE_FILE = "state.json"
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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, keep: int | None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:08d}"
    staging = folder / f".step-{state.step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(trainable_state(model), staging / "trainable.safetensors")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    save_file(_rng_state(), staging / "rng.safetensors")
    _write_atomic(staging / STATE_FILE, json.dumps(asdict(state), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(folder)
    if keep:
        for old in committed_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {path} does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unknown {unknown[:3]}); was the adapter config changed?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    _set_rng_state(load_file(path / "rng.safetensors"))
    return TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`never` -> None; `auto` -> the latest committed checkpoint (or None); else an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = committed_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path
