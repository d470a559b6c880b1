"""`tunesmith train CONFIG --processes N`: N ranks on this machine through torch's elastic launcher.

This is the launcher behind `torchrun`, used as a library: it picks a free port, sets RANK,
WORLD_SIZE and MASTER_ADDR/PORT for each rank, watches them, and when one rank dies it stops the
others and reports the failure, so a crashed rank never leaves the rest waiting in a collective.
Each rank then runs the ordinary loop; accelerate joins the process group (gloo on CPU, NCCL on
GPUs). Only rank 0 speaks: the other ranks' output goes to log files that are kept when the run fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.config.schema import RunConfig
from tunesmith.training.loop import TrainResult


class RankFailed(RuntimeError):
    """A rank of a several-process run stopped with an error; the message is that rank's error."""


def check_processes(processes: int) -> None:
    """Refuse a process count this machine cannot run, before anything starts."""
    import torch

    if processes < 1:
        raise ValueError(f"--processes {processes}: give 1 or more processes")
    if os.environ.get("WORLD_SIZE") is not None:
        raise ValueError(
            "--processes starts its own ranks, but this process already runs inside a launch "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']}, from torchrun or accelerate launch); drop --processes"
        )
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ValueError(
            f"--processes {processes}: this machine has {torch.cuda.device_count()} GPU(s), one per "
            "process; give at most that many"
        )


def threads_per_rank(processes: int) -> int:
    """CPU threads each rank may use: the cores this process may run on, shared out evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes)


def launch_train(
    cfg: RunConfig, processes: int, show_progress: bool = True, stop_after_step: int | None = None
) -> TrainResult:
    """Train `cfg` on `processes` ranks of this machine; returns rank 0's result (without the model).

    `stop_after_step` acts like a Ctrl-C after that step, as in `train` (for tests)."""
    check_processes(processes)
    threads = 0 if _has_gpu() else threads_per_rank(processes)
    return run_ranks(_rank_main, (cfg, threads, show_progress, stop_after_step), processes)[0]


def run_ranks(fn: Callable[..., Any], args: tuple[Any, ...], processes: int) -> dict[int, Any]:
    """`fn(*args)` on `processes` ranks of this machine; each rank's return value by rank.

    `fn` must be importable by name (the ranks are fresh interpreters). Raises RankFailed with the
    failing rank's error when any rank fails; the other ranks are stopped first."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log_dir = Path(tempfile.mkdtemp(prefix="tunesmith-ranks-"))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # port 0: the launcher takes a free one (torchrun --standalone)
        max_restarts=0,  # a failed rank fails the run; restarting would repeat the same error
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(
            log_dir=str(log_dir), redirects={rank: Std.ALL for rank in range(1, processes)}
        ),
        # Ctrl-C reaches every rank from the terminal; the ranks agree to checkpoint and stop at the
        # same step. The launcher itself only counts it: the second one aborts (see _CtrlC).
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
    )
    try:
        with _CtrlC(), _launcher_logs_quiet():
            results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        raise RankFailed(_failure_message(exc, log_dir)) from None
    shutil.rmtree(log_dir, ignore_errors=True)
    return results


def _rank_main(
    cfg: RunConfig, threads: int, show_progress: bool, stop_after_step: int | None = None
) -> TrainResult:
    """One rank: the ordinary loop (it reads its rank from the environment the launcher set)."""
    import torch

    from tunesmith.cli.quiet import quiet_libraries
    from tunesmith.training.loop import train

    quiet_libraries(False)
    if threads:
        torch.set_num_threads(threads)
    result = train(cfg, show_progress=show_progress, stop_after_step=stop_after_step)
    result.model = None  # rank 0's answer travels back by pickle; the weights are in the run directory
    return result


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _failure_message(exc: Any, log_dir: Path) -> str:
    """The error of the rank that failed first with an exception of its own.

    When one rank dies, the others often fail too, inside a collective whose peer went away; those
    errors are consequences, so a rank's own error is preferred to a communication error."""
    failures = exc.failures  # global rank -> ProcessFailure
    raised = {rank: f for rank, f in failures.items() if os.path.isfile(f.error_file)}
    chosen = raised or failures

    def order(rank: int) -> tuple[bool, int, int]:
        return (_is_consequence(_text(chosen[rank].message)), chosen[rank].timestamp, rank)

    rank = min(chosen, key=order)
    failure = chosen[rank]
    message = _text(failure.message) if raised else f"exited with code {failure.exitcode}"
    where = f" (the other ranks' output is in {log_dir})" if rank != 0 else ""
    return f"rank {rank} failed: {message}{where}"


def _text(message: Any) -> str:
    return str(message.get("message", message)) if isinstance(message, dict) else str(message)


_PEER_GONE = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")


def _is_consequence(message: str) -> bool:
    """An error a rank meets because another rank died (its collective lost a peer)."""
    return any(marker in message for marker in _PEER_GONE)


_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")


@contextlib.contextmanager
def _launcher_logs_quiet() -> Iterator[None]:
    """The launcher logs each failed rank's traceback and every stopped rank; the command says the
    one error that matters instead (all of it shows with -v, which logs at DEBUG)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _LAUNCHER_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


class _CtrlC:
    """In the launcher, the first Ctrl-C waits for the ranks to checkpoint and stop; a second aborts.

    The terminal sends Ctrl-C to every rank as well as to the launcher; the ranks handle it.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
