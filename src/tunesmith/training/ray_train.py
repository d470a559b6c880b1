"""The same loop on a Ray cluster: Ray Train's TorchTrainer starts the workers and their process group.

Ray places one worker per slot (`cpus_per_worker` / `gpus_per_worker`), sets RANK, WORLD_SIZE and
LOCAL_RANK and initialises torch.distributed (gloo on CPU, NCCL on GPUs); each worker then runs the
ordinary `train`, whose accelerator joins that group. Nothing here schedules processes: Ray does.

Across machines the run directory (`output.dir`) must be on storage every node reads and writes at
the same path: rank 0 writes it, and every rank reads the checkpoints on resume.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tunesmith.config.schema import RunConfig
from tunesmith.training.launch import RankFailed
from tunesmith.training.loop import TrainResult


class RayMissing(RuntimeError):
    """Ray Train is not installed."""


def ray_train(
    cfg: RunConfig,
    workers: int,
    address: str | None = "local",
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    storage_path: str | None = None,
) -> TrainResult:
    """Train `cfg` on `workers` Ray workers; `address`: "local" starts a Ray instance on this machine,
    "auto" or "ray://host:port" joins a running cluster. Returns what rank 0 wrote (no model)."""
    try:
        import ray
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise RayMissing('Ray Train is not installed: pip install "ray[train]"') from None
    if workers < 1:
        raise ValueError(f"workers={workers}: give 1 or more Ray workers")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
    use_gpu = gpus_per_worker > 0
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "threads": max(1, int(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=Path(cfg.output.dir).name,
            storage_path=storage_path or tempfile.mkdtemp(prefix="tunesmith-ray-"),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps a worker's error; keep its last lines, which name it
        raise RankFailed(f"a Ray worker failed: {_last_lines(str(exc))}") from exc
    finally:
        if started_here:
            ray.shutdown()
    return _result_from_run_dir(Path(cfg.output.dir))


def _ray_worker(config: dict[str, Any]) -> None:
    import torch

    from tunesmith.cli.quiet import quiet_libraries
    from tunesmith.training.loop import train

    quiet_libraries(False)
    torch.set_num_threads(config["threads"])
    train(config["cfg"], show_progress=False)


def _result_from_run_dir(run_dir: Path) -> TrainResult:
    """Rank 0's result as its run directory records it (the workers' return values stay in Ray)."""
    from tunesmith.training.metrics import read_metrics
    from tunesmith.training.run_dir import read_status

    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    status = read_status(run_dir)
    steps = int(status.get("steps") or len(losses))
    return TrainResult(
        run_dir, steps, status.get("status") == "interrupted", losses[-1] if losses else None, losses
    )


def _last_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])
