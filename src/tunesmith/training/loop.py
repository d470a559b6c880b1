"""The one training loop: accelerate for devices and distribution, everything else explicit."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.load import dump_config
from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.training.batching import MicroBatch
from tunesmith.training.checkpoint import (
    NonFiniteWeights,
    TrainerState,
    resume_candidates,
)
from tunesmith.training.durable import write_text_atomic
from tunesmith.training.errors import TrainingDiverged
from tunesmith.training.methods import get_method
from tunesmith.training.methods.base import LossOutput, Method, PreparedData, finish_metrics, term_units
from tunesmith.training.metrics import MetricsLog, plot_curves, step_metric_means
from tunesmith.training.optim import make_optimizer, make_scheduler
from tunesmith.training.precision import (
    accelerate_mixed_precision,
    allow_new_mixed_precision,
    choose_precision,
    restore_fp32,
    store_frozen_linear_weights,
)
from tunesmith.training.progress import ProgressReporter
from tunesmith.training.run_dir import RunLock, create_run_dir, prepare_run_dir, save_final
from tunesmith.training.trainer_checkpoints import CheckpointingMixin, own_parameters, resume_command

log = logging.getLogger(__name__)


__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "train"]

FP16_MAX_CONSECUTIVE_OVERFLOWS = 24
"""fp16: the loss scale halves at each overflow; 24 in a row take it from 2**16 to 2**-8, where an
overflow is no longer a scaling problem but real infinities."""

ZERO_GRAD_PATIENCE = 3
"""Steps in a row with a gradient norm of exactly 0 (and tokens to train on) that mean a dead model."""


class StopRequested:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second Ctrl-C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequested:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C handling stays with the caller
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    interrupted: bool
    final_loss: float | None
    losses: list[float]
    model: Any = None  # the trained (unwrapped) model, for callers in the same process


def train(cfg: RunConfig, show_progress: bool = True, stop_after_step: int | None = None) -> TrainResult:
    """Run a whole training job. `stop_after_step` acts like a Ctrl-C after that step (for tests)."""
    from tunesmith.training.progress import phases_shown
    from tunesmith.training.run_dir import failure_reason, mark_ended

    run_dir = Path(cfg.output.dir)
    create_run_dir(run_dir)
    lock = RunLock(run_dir) if _is_launch_rank_zero() else None
    if lock is not None:
        lock.acquire()
    try:
        with phases_shown(show_progress and _is_launch_rank_zero()):
            result = _train_locked(cfg, run_dir, show_progress, stop_after_step)
    except KeyboardInterrupt:
        if lock is not None:
            mark_ended(run_dir, "interrupted", "stopped by a second Ctrl-C (no checkpoint)")
        raise
    except BaseException as exc:
        if lock is not None:
            mark_ended(run_dir, "failed", failure_reason(exc))
        raise
    else:
        if lock is not None:
            status, reason = "finished", None
            if result.interrupted:
                status, reason = "interrupted", f"stopped at step {result.steps}; continue with --resume"
            mark_ended(run_dir, status, reason, steps=result.steps)
        return result
    finally:
        if lock is not None:
            lock.release()


def _is_launch_rank_zero() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a single process): the one that owns the run directory."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (a barrier too: the others wait until rank 0 has it)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train_locked(
    cfg: RunConfig, run_dir: Path, show_progress: bool, stop_after_step: int | None
) -> TrainResult:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    from tunesmith.models.adapters import apply_adapter, compile_decoder_layers, count_parameters
    from tunesmith.models.attention import choose_attention
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.training.distributed import accelerator_plugins
    from tunesmith.training.progress import phase, start_phase

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # `distributed:` (DDP when absent) is checked before anything is written.
    plugins = accelerator_plugins(cfg.distributed, device_type, cfg.train.max_grad_norm)
    # The process group comes first (a no-op for one process): rank 0 alone prepares the run
    # directory and measures the precision, and the other ranks follow what it found. On a machine
    # without a GPU every rank needs cpu=True, or accelerate leaves each rank training its own copy.
    processes = PartialState(cpu=device_type == "cpu")
    if processes.is_main_process:
        candidates = resume_candidates(run_dir, cfg.train.resume)
        prepare_run_dir(
            run_dir,
            resuming=bool(candidates),
            overwrite=cfg.output.overwrite,
            resume_requested=cfg.train.resume == "auto",
        )
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        from tunesmith.training.run_dir import mark_running

        mark_running(run_dir)
        precision_choice = choose_precision(cfg.train.precision, device_type)
    if processes.num_processes > 1:
        precision_choice = _from_rank_zero(precision_choice if processes.is_main_process else None)
        candidates = resume_candidates(run_dir, cfg.train.resume)  # after rank 0 prepared the directory
    no_checkpoint_note = (
        f"resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0"
        if cfg.train.resume == "auto" and not candidates
        else None
    )
    precision = precision_choice.precision
    # fp16 needs loss scaling, which the loop does itself (GradScaler works on CPU and GPU alike;
    # accelerate has none on CPU), so accelerate runs it as full precision.
    mixed_precision = "no" if precision == "fp16" else accelerate_mixed_precision(precision)
    allow_new_mixed_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device_type == "cpu", **plugins)
    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slowed CPU steps up to 5.5x as weights drifted small
    set_seed(cfg.train.seed)
    attention = choose_attention(cfg.train.attention, accelerator.device.type)
    loading = start_phase(f"loading model {cfg.model}")
    model, tokenizer, model_dir = load_model_and_tokenizer(
        cfg.model, trust_remote_code=cfg.trust_remote_code, attention=attention, adapter=cfg.adapter
    )
    loading.done()
    method = get_method(cfg.method)
    with phase("preparing data"):
        prepared = method.prepare_data(cfg, tokenizer)
    data = prepared.data
    # `processes`: a step's micro-batches are grad_accum x processes, which resume across process
    # counts needs to compare.
    fingerprint = {
        "config": cfg.model_dump(mode="json"),
        "data": prepared.fingerprint,
        "processes": processes.num_processes,
    }
    model = apply_adapter(model, cfg.adapter, tokenizer)
    lean_note = None
    if cfg.train.lean_activations:
        from tunesmith.models.lean_layers import apply_lean_layers

        lean_note = apply_lean_layers(model).summary()
    low_precision_base = precision == "bf16" and isinstance(cfg.adapter, LoraAdapter)
    if low_precision_base:  # only the adapter is saved, so the base may live in bf16
        store_frozen_linear_weights(model, torch.bfloat16)
    if cfg.train.compile:
        compile_decoder_layers(model)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if cfg.train.neftune_alpha is not None:
        from tunesmith.training.neftune import attach_neftune

        attach_neftune(model, cfg.train.neftune_alpha)
    trainable, total = count_parameters(model)

    trainer = Trainer(
        cfg,
        accelerator,
        model,
        tokenizer,
        method,
        prepared,
        run_dir,
        show_progress,
        attention,
        precision=precision,
        fingerprint=fingerprint,
    )
    if no_checkpoint_note:
        trainer.reporter_message(no_checkpoint_note)
    if lean_note:
        trainer.reporter_message(lean_note)
    trainer.reporter_message(
        f"model {cfg.model} ({model_dir}); training {trainable:,} of {total:,} parameters "
        f"({cfg.adapter.type}); precision {precision} ({precision_choice.reason})"
        f"{' (frozen weights in bf16)' if low_precision_base else ''}; data: {data.report.summary()}"
    )
    try:
        result = trainer.run(candidates, stop_after_step)
    finally:
        trainer.close()
    wrapper = accelerator.unwrap_model(trainer.wrapped)
    result.model = wrapper.model
    if low_precision_base:
        restore_fp32(result.model)
    if not result.interrupted and accelerator.is_main_process:
        head = {name: p.detach().float().cpu().contiguous() for name, p in own_parameters(wrapper).items()}
        try:
            save_final(run_dir, result.model, tokenizer, cfg, model_dir, head=head or None)
        except NonFiniteWeights as exc:
            raise TrainingDiverged(f"{exc}; the final model was not saved. Try a lower train.lr") from None
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return result


class Trainer(CheckpointingMixin):
    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Any,
        model: torch.nn.Module,
        tokenizer: Any,
        method: Method,
        prepared: PreparedData,
        run_dir: Path,
        show_progress: bool,
        attention: str = "sdpa",
        precision: str = "fp32",
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        from tunesmith.training.tracking import Trackers, check_installed

        check_installed(cfg.tracking.backends)  # a missing tracker package stops the run before any work
        t = cfg.train
        self.cfg, self.accelerator, self.method, self.run_dir = cfg, accelerator, method, run_dir
        self.tokenizer = tokenizer
        self.data_report = prepared.data.report
        self.trackers = Trackers([])
        self.fingerprint = fingerprint
        self.scaler = torch.amp.GradScaler(accelerator.device.type) if precision == "fp16" else None
        self.consecutive_overflows = 0
        self.zero_grad_steps = 0
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
        self.stream, self.eval_stream = method.batches(prepared, cfg, tokenizer.pad_token_id, attention)
        prepared.data.report.packing_fill = self.stream.fill
        self.total_micro = self._total_micro_batches()
        self.total_steps = t.max_steps or self._steps_until(self.total_micro)
        # The optimizer takes the wrapper's parameters: the model's, in the same order as ever (old
        # checkpoints' optimizer states still line up), then any the method adds (a reward head).
        wrapper = method.wrap_model(model, cfg)
        optimizer = make_optimizer(wrapper, cfg)
        self.scheduler = make_scheduler(optimizer, t, self.total_steps)
        self.wrapped, self.optimizer = accelerator.prepare(wrapper, optimizer)
        self.reporter = ProgressReporter(
            self.total_steps, 0, enabled=show_progress and accelerator.is_main_process
        )
        self.state = TrainerState(0, 0, 0, 0, {})
        self.stop: StopRequested | None = None  # Ctrl-C of this process
        self.stop_agreed = False  # several processes: whether any was asked to stop, as of the last step
        self._non_finite_rows: list[str] = []
        self.last_saved_step: int | None = None

    # -- which micro-batches each step takes: an epoch ends where its data ends --------------------
    # Positions count micro-batches of the whole run, all processes together: a step from position
    # p takes p, p+1, ... and rank r gets p+r, p+r+world, ... So N processes x grad_accum a see the
    # micro-batches of one process x grad_accum N*a, and a checkpoint's position means the same
    # whatever the number of processes.

    def _epoch_end(self, index: int) -> int | None:
        """The first micro-batch position after the epoch that `index` falls in (None: no epochs)."""
        per_epoch = self.stream.per_epoch
        if per_epoch is None:
            return None
        return (index // per_epoch + 1) * per_epoch

    def _total_micro_batches(self) -> int | None:
        t = self.cfg.train
        if t.max_steps or self.stream.per_epoch is None:
            return None
        return max(1, math.ceil(t.epochs * self.stream.per_epoch))

    def _micro_count(self, start: int) -> int:
        """Micro-batches (all processes) step by step from `start`: grad_accum x processes, fewer
        where an epoch or the run ends."""
        count = self.cfg.train.grad_accum * self.accelerator.num_processes
        end = self._epoch_end(start)
        if end is not None:
            count = min(count, end - start)
        if self.total_micro is not None:
            count = min(count, self.total_micro - start)
        return max(count, 1)

    def _steps_until(self, total_micro: int | None) -> int:
        assert total_micro is not None
        steps, done = 0, 0
        while done < total_micro:
            done += self._micro_count(done)
            steps += 1
        return steps

    def reporter_message(self, text: str) -> None:
        self.reporter.message(text)

    def close(self) -> None:
        try:
            self.trackers.finish(ok=False)  # a no-op after a run that got to its end; else marks it failed
        except Exception as exc:  # never hide the error that stopped the run behind a tracker's
            log.warning("closing the trackers failed: %s", exc)
        self.reporter.close()

    def run(self, candidates: list[Path] | Path | None, stop_after_step: int | None = None) -> TrainResult:
        if isinstance(candidates, Path):
            candidates = [candidates]
        resumed = bool(candidates)
        if candidates:
            self._restore(candidates)
        from tunesmith.training.tracking import finish_trackers, open_trackers, run_summary

        resume_step = self.state.step if resumed else None
        main = self.accelerator.is_main_process
        self.trackers = open_trackers(self.cfg, self.run_dir, resume_step, main, self.data_report)
        for line in self.trackers.where():
            self.reporter.message(f"tracking to {line}")
        metrics: MetricsLog | _NoMetrics = (
            MetricsLog(self.run_dir / "metrics.jsonl", resume_step, sinks=[self.trackers.log_row])
            if main
            else _NoMetrics()
        )
        t = self.cfg.train
        started, tokens_at_start = time.perf_counter(), self.state.tokens_seen
        losses: list[float] = []
        interrupted = False
        self.wrapped.train()
        with StopRequested() as stop:
            while self.state.step < self.total_steps:
                self.stop = stop
                row = self._train_step()
                losses.append(row["loss"])
                if stop_after_step is not None and self.state.step >= stop_after_step:
                    stop.requested = self.stop_agreed = True
                elapsed = time.perf_counter() - started
                row["tokens_per_s"] = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                row["elapsed_s"] = round(elapsed, 3)
                if self.state.step % t.log_every == 0 or self.state.step == self.total_steps:
                    metrics.write(row)
                self.reporter.update(row)
                at_end = self.state.step == self.total_steps
                if (self.eval_stream or self.cfg.eval.tasks) and (
                    (t.eval_every and self.state.step % t.eval_every == 0) or at_end or self._epoch_ended()
                ):
                    eval_row: dict[str, Any] = {"step": self.state.step}
                    if self.eval_stream:
                        eval_row["eval_loss"] = self.evaluate()
                        self.reporter.message(
                            f"step {self.state.step}: eval loss {eval_row['eval_loss']:.4f}"
                        )
                    eval_row.update(self.evaluate_tasks())
                    metrics.write(eval_row)
                if (t.save_every and self.state.step % t.save_every == 0) or at_end:
                    self._save()
                # Several processes act on the flag they agreed on in the step, never on their own: a
                # Ctrl-C arriving after that agreement waits for the next step on every rank alike.
                stopping = stop.requested if self.accelerator.num_processes == 1 else self.stop_agreed
                if stopping and not at_end:
                    path = self._save()
                    self.reporter.message(
                        f"stopped at step {self.state.step}; checkpoint {path}; "
                        f"continue with: {resume_command(self.run_dir)}"
                    )
                    interrupted = True
                    break
        if self.trackers:
            summary = run_summary(self.run_dir, self.state.step, self.total_steps, interrupted)
            finish_trackers(self.trackers, self.run_dir, summary)
        return TrainResult(self.run_dir, self.state.step, interrupted, losses[-1] if losses else None, losses)

    def _epoch_ended(self) -> bool:
        if self.cfg.train.eval_every or self.stream.per_epoch is None:
            return False
        done = self.state.micro_batches_done
        return self._epoch_end(done - 1) == done

    def _step_micro_batches(self, first: int, count: int) -> tuple[list[MicroBatch], int]:
        """This rank's micro-batches of the step at position `first` covering `count` positions, and
        how many of them are real. Where the step's positions do not divide evenly among the ranks
        (an epoch's or the run's end), a rank fills up with copies of a real micro-batch that the
        loop weighs 0: every rank then runs the same number of backward passes, as DDP requires."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = -(-count // world)
        positions = [first + i * world + rank for i in range(per_rank)]
        real = [p for p in positions if p < first + count]
        micro = [self.stream.micro_batch(p) for p in real]
        if len(real) < per_rank:
            filler = micro[0] if micro else self.stream.micro_batch(first)
            micro += [filler] * (per_rank - len(real))
        return micro, len(real)

    def _train_step(self) -> dict[str, Any]:
        t, stop = self.cfg.train, self.stop
        first = self.state.micro_batches_done
        world = self.accelerator.num_processes
        count = self._micro_count(first)
        micro, real = self._step_micro_batches(first, count)
        step_units, step_terms = self._step_units(micro[:real])
        scale = world / max(step_units, 1)
        term_scales = {name: world / max(n, 1) for name, n in step_terms.items()}
        loss_total = 0.0
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, float] = {}
        self._non_finite_rows = []
        for i, mb in enumerate(micro):
            weight = 1.0 if i < real else 0.0
            loss_total += self._backward(
                mb,
                scale * weight,
                {name: value * weight for name, value in term_scales.items()},
                metric_sums if weight else {},
                metric_counts if weight else {},
                sync=i == len(micro) - 1,
            )
        real_tokens = sum(mb.real_tokens for mb in micro[:real])
        trained_tokens = sum(mb.trained_tokens for mb in micro[:real])
        if world > 1:
            loss, real_tokens, trained_tokens, stop_any = self._reduce_step(
                loss_total / world, real_tokens, trained_tokens, stop
            )
            self.stop_agreed = stop_any
        else:
            loss = loss_total / world
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer.optimizer)  # norms and clipping see the true gradients
        grad_norm = self._clip(t.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        skipped = False
        if not math.isfinite(grad_norm) and self.scaler is not None:
            skipped = self._fp16_overflow(grad_norm)
        elif not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"step {self.state.step + 1}: gradient norm is {grad_norm}; no checkpoint was written for it. "
                f"Batch rows: {', '.join(s for mb in micro for s in mb.sources[:8])}. "
                f"{self._last_good_hint()}"
            )
        else:
            self.consecutive_overflows = 0
            self._check_not_collapsed(grad_norm, loss, step_units)
        if self.scaler is not None:
            self.scaler.step(self.optimizer.optimizer)  # skips the update when gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.micro_batches_done += count
        self.state.tokens_seen += real_tokens
        self.state.trained_tokens_seen += trained_tokens
        return {
            "step": self.state.step,
            "epoch": None
            if self.stream.per_epoch is None
            else round(self.state.micro_batches_done / len(self.stream), 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens": self.state.tokens_seen,
            "trained_tokens": self.state.trained_tokens_seen,
            **self._metric_means(metric_sums, metric_counts, step_units),
            **({"skipped": True} if skipped else {}),
            **(
                {"loss_scale": self.scaler.get_scale(), "overflow_steps": self.state.overflow_steps}
                if self.scaler is not None
                else {}
            ),
        }

    def _reduce_step(
        self, loss: float, real_tokens: int, trained_tokens: int, stop: StopRequested | None
    ) -> tuple[float, int, int, bool]:
        """The step's loss and token counts over all processes, and whether any process was asked to
        stop or saw a non-finite loss (then every process raises at the same step, not one alone)."""
        local_stop = bool(stop is not None and stop.requested)
        bad = len(self._non_finite_rows)
        totals = self._global_sums_float(
            [loss, float(real_tokens), float(trained_tokens), float(local_stop), float(bad)]
        )
        if totals[4]:
            rows = ", ".join(self._non_finite_rows[:8]) or "on another process"
            raise TrainingDiverged(
                f"step {self.state.step + 1}: loss is not finite on {int(totals[4])} micro-batch(es); no "
                f"checkpoint was written for it. Batch rows: {rows}. Check these rows, or: "
                f"{self._last_good_hint()}"
            )
        return totals[0], int(totals[1]), int(totals[2]), bool(totals[3])

    def _save(self) -> Path | None:
        """Rank 0 writes the checkpoint; the others wait until it is committed (one process: as ever)."""
        path = super()._save()
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
        return path

    def _fp16_overflow(self, grad_norm: float) -> bool:
        """An fp16 overflow: the scaler skips this update and halves its scale; many in a row stop the run."""
        self.consecutive_overflows += 1
        self.state.overflow_steps += 1
        if self.consecutive_overflows >= FP16_MAX_CONSECUTIVE_OVERFLOWS:
            raise TrainingDiverged(
                f"step {self.state.step + 1}: fp16 gradients overflowed {self.consecutive_overflows} steps in a "
                f"row (loss scale now {self.scaler.get_scale() if self.scaler else 0:g}); the gradients are "
                f"not finite at any scale. Use train.precision=bf16 or fp32, or a lower train.lr. "
                f"{self._last_good_hint()}"
            )
        self.reporter.message(
            f"step {self.state.step + 1}: fp16 gradient overflow (norm {grad_norm}); update skipped, "
            "loss scale lowered"
        )
        return True

    def _check_not_collapsed(self, grad_norm: float, loss: float, step_tokens: int) -> None:
        """A gradient norm of exactly 0 with tokens to train means the model is dead, not converged."""
        if grad_norm != 0.0 or step_tokens == 0 or getattr(self.method, "zero_gradient_is_normal", False):
            self.zero_grad_steps = 0
            return
        self.zero_grad_steps += 1
        uniform = self.vocab_size > 1 and abs(loss - math.log(self.vocab_size)) < 1e-3
        if not uniform and self.zero_grad_steps < ZERO_GRAD_PATIENCE:
            return
        how = (
            f"the loss sits at {loss:.4f} = ln(vocab size {self.vocab_size}), a uniform prediction, and "
            if uniform
            else ""
        )
        set_aside_note = self._set_aside_dead_checkpoints(self.state.step - self.zero_grad_steps + 1)
        raise TrainingDiverged(
            f"step {self.state.step + 1}: training collapsed: {how}the gradient norm is exactly 0 "
            f"({self.zero_grad_steps} step(s) in a row), so the weights can no longer learn (most often from a "
            f"learning rate far too high, now train.lr={self.cfg.train.lr:g}). Nothing was saved for this "
            f"step{set_aside_note}. {self._last_good_hint()}"
        )

    def _step_units(self, micro: list[MicroBatch]) -> tuple[int, dict[str, int]]:
        """The step's loss units and the units of each further loss term, on all processes (one reduce)."""
        terms: dict[str, int] = {}
        for mb in micro:
            for name, n in term_units(self.method, mb).items():
                terms[name] = terms.get(name, 0) + n
        names = sorted(terms)
        local = [sum(mb.units for mb in micro), *(terms[name] for name in names)]
        if self.accelerator.num_processes == 1:
            totals = local
        else:
            tensor = torch.tensor(local, device=self.accelerator.device)
            totals = [int(v) for v in self.accelerator.reduce(tensor, reduction="sum").tolist()]
        return totals[0], dict(zip(names, totals[1:], strict=True))

    def _metric_means(
        self, sums: dict[str, float], counts: dict[str, float], step_units: int
    ) -> dict[str, float]:
        """A method's metrics (sums) as means over the step on every process: over their own counts
        where the method gave them, over the step's units otherwise."""
        if not sums:
            return {}
        names, count_names = sorted(sums), sorted(counts)
        values = self._global_sums_float(
            [sums[name] for name in names] + [counts[name] for name in count_names]
        )
        total_sums = dict(zip(names, values[: len(names)], strict=True))
        total_counts = dict(zip(count_names, values[len(names) :], strict=True))
        return finish_metrics(self.method, step_metric_means(total_sums, total_counts, step_units))

    def _scaled_loss(self, out: LossOutput, scale: float, term_scales: dict[str, float]) -> torch.Tensor:
        """The micro-batch's share of the step's loss: each part divided by the step's count of its unit."""
        loss = out.loss_sum * scale
        for name, value in out.terms.items():
            if name not in term_scales:
                raise ValueError(
                    f"method {self.method.name}: its loss has a term in {name!r} units, but its term_units() "
                    f"gave no count of them; count {name!r} in term_units() for every micro-batch"
                )
            loss = loss + value * term_scales[name]
        return loss

    def _backward(
        self,
        mb: MicroBatch,
        scale: float,
        term_scales: dict[str, float],
        metric_sums: dict[str, float],
        metric_counts: dict[str, float],
        sync: bool,
    ) -> float:
        batch = {k: v.to(self.accelerator.device) for k, v in mb.tensors.items()}
        sync_context = self.accelerator.no_sync(self.wrapped) if not sync else contextlib.nullcontext()
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=True)
            if self.cfg.train.activation_offload and self.accelerator.device.type == "cuda"
            else contextlib.nullcontext()
        )
        world = self.accelerator.num_processes
        with sync_context, offload, self._autocast():
            out = self.method.compute_loss(self.wrapped, batch)
            loss = self._scaled_loss(out, scale, term_scales)
            if world > 1 and (scale == 0 or mb.units == 0):
                # DDP's reducer wants a gradient for every trainable parameter from each process: a
                # micro-batch that trains nothing still reaches all of them, with zeros.
                loss = loss + sum(p.sum() for p in self.wrapped.parameters() if p.requires_grad) * 0.0
        for name, value in out.metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
        for name, value in out.metric_counts.items():
            metric_counts[name] = metric_counts.get(name, 0.0) + float(value)
        if not torch.isfinite(loss):
            if world > 1:  # decided with the other processes after the step (_reduce_step)
                self._non_finite_rows.extend(mb.sources[:8])
            else:
                raise TrainingDiverged(
                    f"step {self.state.step + 1}: loss is {loss.item()}; no checkpoint was written for it. "
                    f"Batch rows: {', '.join(mb.sources[:8])}. Check these rows, or: {self._last_good_hint()}"
                )
        self.accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)
        return float(loss.detach())

    def _autocast(self) -> Any:
        if self.scaler is not None:
            return torch.autocast(self.accelerator.device.type, dtype=torch.float16)
        return self.accelerator.autocast()

    def _clip(self, max_norm: float | None) -> float:
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        if max_norm:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float]:
        """`eval.tasks` on the model as it is now, as `eval/<task>/<metric>` (rank 0 scores them alone).

        The tasks see the run's chat template and the same autocast as the training forward."""
        if not self.cfg.eval.tasks or not self.accelerator.is_main_process:
            return {}
        from tunesmith.eval.tasks import run_task
        from tunesmith.training.run_dir import training_template_on

        model = self.accelerator.unwrap_model(self.wrapped).model
        stems = [Path(task.path).stem for task in self.cfg.eval.tasks]
        values: dict[str, float] = {}
        with training_template_on(self.tokenizer, self.cfg), self._autocast():
            for task, stem in zip(self.cfg.eval.tasks, stems, strict=True):
                name = stem if stems.count(stem) == 1 else f"{task.kind}_{stem}"
                result = run_task(model, self.tokenizer, task, template=self.cfg.data.template)
                values.update({f"eval/{name}/{metric}": value for metric, value in result.metrics.items()})
                shown = ", ".join(f"{m} {v:.4f}" for m, v in list(result.metrics.items())[:3])
                self.reporter.message(f"step {self.state.step}: {task.kind}:{task.path}: {shown}")
        self.wrapped.train()
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        assert self.eval_stream is not None
        self.wrapped.eval()
        total, count = 0.0, 0
        term_sums: dict[str, float] = {}
        term_counts: dict[str, int] = {}
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for index in range(rank, len(self.eval_stream), world):  # each process its share; summed below
            mb = self.eval_stream.micro_batch(index)
            batch = {k: v.to(self.accelerator.device) for k, v in mb.tensors.items()}
            with self._autocast():
                out = self.method.compute_loss(self.wrapped, batch)
            total += float(out.loss_sum)
            count += int(out.count)
            for name, value in out.terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value)
            for name, n in term_units(self.method, mb).items():
                term_counts[name] = term_counts.get(name, 0) + n
        self.wrapped.train()
        names = sorted(term_counts)
        totals = self._global_sums_float(
            [
                total,
                float(count),
                *(term_sums.get(name, 0.0) for name in names),
                *(term_counts[n] for n in names),
            ]
        )
        loss = totals[0] / max(totals[1], 1)
        for i in range(len(names)):  # each further term over its own units, as in training
            loss += totals[2 + i] / max(totals[2 + len(names) + i], 1)
        return loss

    def _global_sums_float(self, values: list[float]) -> list[float]:
        """`values` summed over processes, in float64, in one reduce."""
        if self.accelerator.num_processes == 1 or not values:
            return [float(v) for v in values]
        tensor = torch.tensor(values, device=self.accelerator.device, dtype=torch.float64)
        return [float(v) for v in self.accelerator.reduce(tensor, reduction="sum").tolist()]


class _NoMetrics:
    """What ranks other than 0 log to: only rank 0 writes metrics.jsonl and feeds the trackers."""

    def write(self, row: dict[str, Any]) -> None:
        return None


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward (non-reentrant, as torch recommends).

    transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable (5.x); the
    old name still works there but warns.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
