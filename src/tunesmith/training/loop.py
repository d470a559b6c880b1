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
from tunesmith.data.build import BuiltData
from tunesmith.data.streaming import StreamingRows
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import BatchStream, MicroBatch, StreamingBatchStream
from tunesmith.training.checkpoint import (
    TrainerState,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tunesmith.training.losses import CausalLMWithLoss
from tunesmith.training.methods import get_method
from tunesmith.training.metrics import MetricsLog, plot_curves
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.precision import (
    accelerate_mixed_precision,
    allow_new_mixed_precision,
    resolve_precision,
    restore_fp32,
    store_frozen_linear_weights,
)
from tunesmith.training.progress import ProgressReporter
from tunesmith.training.run_dir import prepare_run_dir, save_final

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from tunesmith.models.adapters import apply_adapter, compile_decoder_layers, count_parameters
    from tunesmith.models.attention import choose_attention
    from tunesmith.models.load import load_model_and_tokenizer

    run_dir = Path(cfg.output.dir)
    resume_from = find_resume_checkpoint(run_dir, cfg.train.resume)
    prepare_run_dir(run_dir, resuming=resume_from is not None, overwrite=cfg.output.overwrite)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, device_type)
    mixed_precision = accelerate_mixed_precision(precision)
    allow_new_mixed_precision(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device_type == "cpu")
    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals slowed CPU steps up to 5.5x as weights drifted small
    set_seed(cfg.train.seed)
    attention = choose_attention(cfg.train.attention, accelerator.device.type)
    model, tokenizer, model_dir = load_model_and_tokenizer(
        cfg.model, trust_remote_code=cfg.trust_remote_code, attention=attention
    )
    method = get_method(cfg.method)
    rows = None
    if cfg.data.streaming:
        from tunesmith.data.stream_build import build_streaming

        rows, eval_samples, report = build_streaming(cfg.data, tokenizer, cfg.method, cfg.train.seed)
        data = BuiltData([], eval_samples, report)
    else:
        data = method.build_data(cfg.data, tokenizer)
    model = apply_adapter(model, cfg.adapter)
    low_precision_base = precision == "bf16" and isinstance(cfg.adapter, LoraAdapter)
    if low_precision_base:  # only the adapter is saved, so the base may live in bf16
        store_frozen_linear_weights(model, torch.bfloat16)
    if cfg.train.compile:
        compile_decoder_layers(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    trainable, total = count_parameters(model)

    trainer = Trainer(
        cfg, accelerator, model, tokenizer, method, data, run_dir, show_progress, attention, rows
    )
    trainer.reporter_message(
        f"model {cfg.model} ({model_dir}); training {trainable:,} of {total:,} parameters "
        f"({cfg.adapter.type}); precision {precision}"
        f"{' (frozen weights in bf16)' if low_precision_base else ''}; data: {data.report.summary()}"
    )
    try:
        result = trainer.run(resume_from, stop_after_step)
    finally:
        trainer.close()
    result.model = accelerator.unwrap_model(trainer.wrapped).model
    if low_precision_base:
        restore_fp32(result.model)
    if not result.interrupted and accelerator.is_main_process:
        save_final(run_dir, result.model, tokenizer, cfg, model_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return result


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Any,
        model: torch.nn.Module,
        tokenizer: Any,
        method: Any,
        data: BuiltData,
        run_dir: Path,
        show_progress: bool,
        attention: str = "sdpa",
        stream_rows: StreamingRows | None = None,
    ) -> None:
        t = cfg.train
        self.cfg, self.accelerator, self.method, self.run_dir = cfg, accelerator, method, run_dir
        pad_id, seq_len, packing = tokenizer.pad_token_id, cfg.data.seq_len, cfg.data.packing
        block_mask = packed_mask_kind(attention)
        self.stream: BatchStream | StreamingBatchStream = (
            StreamingBatchStream(stream_rows, t.batch_size, pad_id, packing, block_mask)
            if stream_rows is not None
            else BatchStream(
                data.train, t.batch_size, seq_len, pad_id, packing, t.seed, block_mask=block_mask
            )
        )
        self.eval_stream = (
            BatchStream(
                data.eval,
                t.batch_size,
                seq_len,
                pad_id,
                packing,
                t.seed,
                shuffle=False,
                block_mask=block_mask,
            )
            if data.eval
            else None
        )
        data.report.packing_fill = self.stream.fill
        if t.max_steps:
            self.total_steps = t.max_steps
        else:  # only the in-memory stream has a length (streaming requires max_steps)
            per_process = len(self.stream) / accelerator.num_processes
            self.total_steps = max(1, math.ceil(t.epochs * per_process / t.grad_accum))
        optimizer = build_optimizer(model.parameters(), t.lr, t.weight_decay)
        self.scheduler = build_scheduler(optimizer, t.scheduler, t.warmup_ratio, self.total_steps)
        self.wrapped, self.optimizer = accelerator.prepare(
            CausalLMWithLoss(model, t.loss_chunk_size), optimizer
        )
        self.reporter = ProgressReporter(
            self.total_steps, 0, enabled=show_progress and accelerator.is_main_process
        )
        self.state = TrainerState(0, 0, 0, 0, {})

    def reporter_message(self, text: str) -> None:
        self.reporter.message(text)

    def close(self) -> None:
        self.reporter.close()

    def _restore(self, checkpoint: Path) -> None:
        model = self.accelerator.unwrap_model(self.wrapped).model
        self.state = load_checkpoint(checkpoint, model, self.optimizer)
        self.scheduler.load_state_dict(self.state.scheduler)
        self.stream.load_state_dict(self.state.data)
        self.reporter.message(f"resumed from {checkpoint} at step {self.state.step}")

    def run(self, resume_from: Path | None, stop_after_step: int | None = None) -> TrainResult:
        if resume_from is not None:
            self._restore(resume_from)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.state.step if resume_from else None)
        t = self.cfg.train
        started, tokens_at_start = time.perf_counter(), self.state.tokens_seen
        losses: list[float] = []
        interrupted = False
        self.wrapped.train()
        with StopRequested() as stop:
            while self.state.step < self.total_steps:
                row = self._train_step()
                losses.append(row["loss"])
                if stop_after_step is not None and self.state.step >= stop_after_step:
                    stop.requested = True
                elapsed = time.perf_counter() - started
                row["tokens_per_s"] = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                row["elapsed_s"] = round(elapsed, 3)
                if self.state.step % t.log_every == 0 or self.state.step == self.total_steps:
                    metrics.write(row)
                self.reporter.update(row)
                at_end = self.state.step == self.total_steps
                if self.eval_stream and (
                    (t.eval_every and self.state.step % t.eval_every == 0) or at_end or self._epoch_ended()
                ):
                    eval_loss = self.evaluate()
                    metrics.write({"step": self.state.step, "eval_loss": eval_loss})
                    self.reporter.message(f"step {self.state.step}: eval loss {eval_loss:.4f}")
                if (t.save_every and self.state.step % t.save_every == 0) or at_end:
                    self._save()
                if stop.requested and not at_end:
                    path = self._save()
                    self.reporter.message(
                        f"stopped at step {self.state.step}; checkpoint {path}; "
                        "continue with train.resume=auto"
                    )
                    interrupted = True
                    break
        return TrainResult(self.run_dir, self.state.step, interrupted, losses[-1] if losses else None, losses)

    def _epoch_ended(self) -> bool:
        if self.cfg.train.eval_every:
            return False
        if self.stream.per_epoch is None:
            return False
        per_epoch = len(self.stream) / self.accelerator.num_processes
        done = self.state.micro_batches_done
        return done // per_epoch != (done - self.cfg.train.grad_accum) // per_epoch

    def _save(self) -> Path | None:
        self.state.scheduler = self.scheduler.state_dict()
        self.state.data = self.stream.state_dict()
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        model = self.accelerator.unwrap_model(self.wrapped).model
        return save_checkpoint(
            self.run_dir / "checkpoints", model, self.optimizer, self.state, self.cfg.train.save_total_limit
        )

    def _global_sum(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return int(self.accelerator.reduce(tensor, reduction="sum").item())

    def _train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        first = self.state.micro_batches_done
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        micro = [self.stream.micro_batch((first + i) * world + rank) for i in range(t.grad_accum)]
        step_tokens = self._global_sum(sum(mb.trained_tokens for mb in micro))
        scale = self.accelerator.num_processes / max(step_tokens, 1)
        loss_total = 0.0
        for i, mb in enumerate(micro):
            loss_total += self._backward(mb, scale, sync=i == len(micro) - 1)
        grad_norm = self._clip(t.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"step {self.state.step + 1}: gradient norm is {grad_norm}; no checkpoint was written for it. "
                f"Batch rows: {', '.join(s for mb in micro for s in mb.sources[:8])}. Try a lower train.lr."
            )
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.micro_batches_done += len(micro)
        self.state.tokens_seen += sum(mb.real_tokens for mb in micro)
        self.state.trained_tokens_seen += sum(mb.trained_tokens for mb in micro)
        return {
            "step": self.state.step,
            "epoch": None
            if self.stream.per_epoch is None
            else round(self.state.micro_batches_done * world / len(self.stream), 4),
            "loss": loss_total / self.accelerator.num_processes,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.state.tokens_seen,
            "trained_tokens": self.state.trained_tokens_seen,
        }

    def _backward(self, mb: MicroBatch, scale: float, sync: bool) -> float:
        batch = {k: v.to(self.accelerator.device) for k, v in mb.tensors.items()}
        sync_context = self.accelerator.no_sync(self.wrapped) if not sync else contextlib.nullcontext()
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=True)
            if self.cfg.train.activation_offload and self.accelerator.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with sync_context, offload, self.accelerator.autocast():
            out = self.method.compute_loss(self.wrapped, batch)
            loss = out.loss_sum * scale
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"step {self.state.step + 1}: loss is {loss.item()}; no checkpoint was written for it. "
                f"Batch rows: {', '.join(mb.sources[:8])}. Try a lower train.lr or check these rows."
            )
        self.accelerator.backward(loss)
        return float(loss.detach())

    def _clip(self, max_norm: float | None) -> float:
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        if max_norm:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @torch.no_grad()
    def evaluate(self) -> float:
        assert self.eval_stream is not None
        self.wrapped.eval()
        total, count = 0.0, 0
        for index in range(len(self.eval_stream)):
            mb = self.eval_stream.micro_batch(index)
            batch = {k: v.to(self.accelerator.device) for k, v in mb.tensors.items()}
            with self.accelerator.autocast():
                out = self.method.compute_loss(self.wrapped, batch)
            total += float(out.loss_sum)
            count += int(out.count)
        self.wrapped.train()
        total, count = float(self._global_sum_float(total)), self._global_sum(count)
        return total / max(count, 1)

    def _global_sum_float(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())
