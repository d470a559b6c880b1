"""Checkpoints of a running Trainer: saving each step's state, resuming from the newest good one.

A mixin, so the loop reads as the step it runs; everything here works on the Trainer's own
attributes (accelerator, wrapped model, optimizer, scheduler, stream, state, run_dir, reporter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.training.checkpoint import (
    NonFiniteWeights,
    apply_checkpoint,
    committed_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_aside,
)
from tunesmith.training.errors import RunDirError, TrainingDiverged
from tunesmith.training.resume_policy import check_data, compare_configs


def resume_command(run_dir: Path) -> str:
    import shlex

    return f"tunesmith train {shlex.quote(str(run_dir / 'config.yaml'))} --resume"


def own_parameters(wrapper: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters a method's wrapper holds beside its model's (a reward head), named as in
    the wrapper. Frozen modules a method keeps (a reference model) are not among them."""
    inner = {id(p) for p in wrapper.model.parameters()}
    return {name: p for name, p in wrapper.named_parameters() if p.requires_grad and id(p) not in inner}


def checkpointed_module(wrapper: torch.nn.Module) -> torch.nn.Module:
    """What a checkpoint holds the trainable parameters of: the model, under the names it always had,
    or the whole wrapper where the method trains parameters of its own (names gain `model.`)."""
    return wrapper if own_parameters(wrapper) else wrapper.model


class CheckpointingMixin:
    """Saving and restoring the Trainer's state (see training/checkpoint.py for the files)."""

    accelerator: Any
    cfg: Any
    fingerprint: dict[str, Any] | None
    last_saved_step: int | None
    optimizer: Any
    reporter: Any
    run_dir: Path
    scaler: Any
    scheduler: Any
    state: Any
    stream: Any
    wrapped: torch.nn.Module

    def _restore(self, candidates: list[Path]) -> None:
        """Resume from the newest checkpoint that loads; unreadable newer ones are set aside, and said so."""
        model = checkpointed_module(self.accelerator.unwrap_model(self.wrapped))
        failures: list[str] = []
        for checkpoint in candidates:
            try:
                loaded = read_checkpoint(checkpoint)
            except Exception as exc:  # truncated or corrupt files: any reader error means "unusable"
                failures.append(f"{checkpoint.name} ({type(exc).__name__}: {str(exc)[:200]})")
                if self.accelerator.is_main_process and checkpoint.parent.name == "checkpoints":
                    moved = set_aside(checkpoint, "unreadable")
                    self.reporter.message(
                        f"resume: checkpoint {checkpoint} cannot be loaded ({str(exc)[:200]}); moved to "
                        f"{moved.name}, trying the previous one"
                    )
                continue
            self._check_resume_compatible(loaded.fingerprint)
            apply_checkpoint(loaded, model, self.optimizer)
            self.state = loaded.state
            self._resume_schedule(self.state.scheduler)
            if self.scaler is not None and self.state.scaler:
                self.scaler.load_state_dict(self.state.scaler)
            self.stream.load_state_dict(self.state.data)
            self.last_saved_step = self.state.step
            self.reporter.message(f"resumed from {checkpoint} at step {self.state.step}")
            return
        raise RunDirError(
            f"no checkpoint of {self.run_dir} could be loaded: {'; '.join(failures)}. Start again with "
            "output.overwrite=true"
        )

    def _check_resume_compatible(self, saved: dict[str, Any] | None) -> None:
        if saved is None or self.fingerprint is None:
            self.reporter.message(
                "resume: this checkpoint has no fingerprint; the config could not be compared"
            )
            return
        changes = compare_configs(
            saved["config"], self.cfg, saved.get("processes"), self.accelerator.num_processes
        )
        check_data(saved, self.fingerprint["data"])
        if changes.applied:
            self.reporter.message(f"resume: applying changed settings: {changes.describe()}")

    def _resume_schedule(self, saved: dict[str, Any]) -> None:
        """Continue the schedule at the saved step, with this config's lr, warmup and horizon.

        The scheduler built from the current config is kept; only its position comes from the
        checkpoint. With an unchanged config this reproduces the saved rates exactly.
        """
        scheduler = self.scheduler
        scheduler.last_epoch = saved["last_epoch"]
        scheduler._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
        lr = self.cfg.train.lr
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        rates = []
        for group, multiplier in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * multiplier(scheduler.last_epoch)
            rates.append(group["lr"])
        scheduler._last_lr = rates

    def _save(self) -> Path | None:
        """Commit a checkpoint for the current step (once per step: a second call returns the first)."""
        folder = self.run_dir / "checkpoints"
        if self.last_saved_step == self.state.step:
            return folder / f"step-{self.state.step:08d}"
        self.state.scheduler = self.scheduler.state_dict()
        self.state.data = self.stream.state_dict()
        self.state.scaler = self.scaler.state_dict() if self.scaler is not None else {}
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            self.last_saved_step = self.state.step
            return None
        model = checkpointed_module(self.accelerator.unwrap_model(self.wrapped))
        try:
            path = save_checkpoint(
                folder, model, self.optimizer, self.state, self.cfg.train.save_total_limit, self.fingerprint
            )
        except NonFiniteWeights as exc:
            raise TrainingDiverged(
                f"step {self.state.step}: {exc}; no checkpoint was written for it. {self._last_good_hint()}"
            ) from None
        self.last_saved_step = self.state.step
        return path

    def _last_good_hint(self) -> str:
        found = committed_checkpoints(self.run_dir / "checkpoints")
        lower = f"{resume_command(self.run_dir)} train.lr=<lower>"
        if found:
            return f"The last good checkpoint is {found[-1].name}: continue from it with a lower lr: {lower}"
        return "No checkpoint was written before it; start again with a lower train.lr"

    def _set_aside_dead_checkpoints(self, first_dead_step: int) -> str:
        """Checkpoints of collapsed weights are renamed (kept, never resumed from); returns a note."""
        if not self.accelerator.is_main_process:
            return ""
        dead = [
            p
            for p in committed_checkpoints(self.run_dir / "checkpoints")
            if int(p.name.split("-")[1]) >= first_dead_step
        ]
        for path in dead:
            set_aside(path, "collapsed")
        if not dead:
            return ""
        return f"; checkpoints holding the collapsed weights were renamed *.collapsed ({len(dead)})"
