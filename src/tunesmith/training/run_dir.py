"""The run directory: created safely, owned by one run at a time, and committed at the end.

The final adapter or model is written like a checkpoint (staged, fsynced, renamed), and
`run.json` is the commit marker written last: readers trust `adapter/` or `model/` only when
`run.json` names it, so a crash during the final save leaves an unfinished run, never a
half-replaced model that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.models.save import save_model_dir
from tunesmith.training.durable import fsync_dir, write_text_atomic
from tunesmith.training.errors import RunDirError

RUN_INFO = "run.json"
LOCK_FILE = ".tunesmith.lock"
TEMPLATE_SAVED = "tokenizer_has_training_template"
"""run.json key: the saved tokenizer carries the chat template training used."""
STATUS_FILE = "status.json"
"""The run's state (running / finished / interrupted / failed) and, for a failure, its reason."""
RUN_STATUSES = ("running", "finished", "interrupted", "failed")
_RUN_FILES = (
    "checkpoints",
    "adapter",
    "model",
    "metrics.jsonl",
    "curves.png",
    RUN_INFO,
    STATUS_FILE,
    # trackers' files (training/tracking.py): a fresh run must not continue the old run's tracker runs
    "tracking.json",
    "tensorboard",
    "wandb",
    "swanlog",
)


def create_run_dir(run_dir: Path) -> None:
    """mkdir -p with the two failures users hit turned into messages that say what to do."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), run_dir)
        raise RunDirError(
            f"output.dir {run_dir} cannot be created: {blocker} is a file, not a directory; "
            "choose another output.dir"
        ) from None
    except OSError as exc:
        reason = {
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.ENOSPC: "no space left on the device",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise RunDirError(
            f"output.dir {run_dir} is not writable: {reason}; choose a writable output.dir"
        ) from None


class RunLock:
    """One run per directory: an exclusive lock held for the whole run.

    The lock file records the owner's pid and host. On POSIX the lock itself is an `flock`, which
    the kernel drops when the owner dies (even by kill -9), so a stale lock file never blocks a new
    run; elsewhere a lock whose pid is no longer alive on this host counts as stale.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._handle: Any = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            import fcntl
        except ImportError:  # no flock: fall back to the recorded pid
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise RunDirError(self._busy_message()) from None
        elif self._owner_alive():
            handle.close()
            raise RunDirError(self._busy_message())
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        self._handle = handle
        return self

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _owner_alive(self) -> bool:
        owner = self._owner()
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _busy_message(self) -> str:
        owner = self._owner()
        who = f" (pid {owner['pid']} on {owner.get('host', '?')})" if "pid" in owner else ""
        return (
            f"output.dir {self.path.parent} is in use by another tunesmith run{who}; wait for it to finish, "
            "stop it, or choose another output.dir"
        )

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()
        finally:
            self._handle.close()  # closing drops the flock
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", RUN_INFO))


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files (never anything else the directory holds)."""
    for name in _RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def prepare_run_dir(run_dir: Path, resuming: bool, overwrite: bool, resume_requested: bool = False) -> None:
    """Refuse to mix two runs in one directory unless asked to resume or overwrite.

    `resume_requested` without a checkpoint to resume from (a run that stopped before its first
    save) starts the run again from step 0 in the same directory: that is what the user asked for.
    """
    create_run_dir(run_dir)
    if not holds_run(run_dir) or resuming:
        return
    if not (overwrite or resume_requested):
        raise RunDirError(
            f"output.dir {run_dir} already holds a run; continue it with --resume (train.resume=auto), "
            "replace it with output.overwrite=true, or choose another output.dir"
        )
    clear_run(run_dir)


def save_final(
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    base_model_dir: Path,
    head: dict[str, Any] | None = None,
) -> Path:
    """LoRA -> `adapter/` (standard PEFT files); full/freeze -> `model/` (safetensors); tokenizer beside it.

    `head`: weights a method trains beside the model (a reward model's `score.weight`), written into
    that directory as `head.safetensors` and named in run.json. run.json goes first (so a crash
    mid-save never leaves an old marker vouching for new files) and comes back last, after the model
    directory and the head are committed.
    """
    from tunesmith.training.checkpoint import check_finite, trainable_state

    check_finite(trainable_state(model), "the trained model")
    if head:
        check_finite(head, "the trained head")
    marker = run_dir / RUN_INFO
    if marker.exists():
        marker.unlink()
        fsync_dir(run_dir)
    is_lora = isinstance(cfg.adapter, LoraAdapter)
    with training_template_on(tokenizer, cfg):
        out = save_model_dir(model, tokenizer, run_dir / ("adapter" if is_lora else "model"))
    info = {
        "base_model": str(base_model_dir),
        "model_spec": cfg.model,
        "kind": out.name,
        "method": cfg.method,
        "trust_remote_code": cfg.trust_remote_code,
        # readers of older runs (without this key) take the template from config.yaml instead
        TEMPLATE_SAVED: True,
    }
    if head:
        info["head"] = _save_head(out, head)
    write_text_atomic(marker, json.dumps(info, indent=1))
    return out


HEAD_FILE = "head.safetensors"


@contextlib.contextmanager
def training_template_on(tokenizer: Any, cfg: RunConfig) -> Iterator[None]:
    """The tokenizer with the run's training template as its `chat_template`, restored afterwards.

    A base model without a template trains with `data.template: NAME`, but its tokenizer never had
    that template: saved as it is, the run could not be chatted with or served.
    """
    from tunesmith.data.templates import run_template

    template, _ = run_template(cfg.model_dump(mode="json"), tokenizer)
    before = getattr(tokenizer, "chat_template", None)
    if template is not None:
        tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = before


def _save_head(out: Path, head: dict[str, Any]) -> str:
    """`out/head.safetensors`, written to a temporary name, fsynced, renamed; returns its name."""
    from safetensors.torch import save_file

    from tunesmith.training.durable import fsync_file

    tmp = out / f".{HEAD_FILE}.tmp"
    save_file(head, tmp)
    fsync_file(tmp)
    os.replace(tmp, out / HEAD_FILE)
    fsync_dir(out)
    return HEAD_FILE


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        if not run_dir.exists():
            raise RunDirError(f"{run_dir} does not exist")
        if holds_run(run_dir) or (run_dir / "config.yaml").is_file():
            raise RunDirError(
                f"{run_dir}: this run has not finished (no {RUN_INFO}); resume it with "
                f"`tunesmith train {run_dir / 'config.yaml'} --resume` (add train.max_steps=N to end it sooner)"
            )
        raise RunDirError(
            f"{run_dir} is not a finished tunesmith run (no {RUN_INFO}); did training complete?"
        )
    return json.loads(path.read_text(encoding="utf-8"))


# -- the run's status: so that a crashed run reads as failed, never as running forever ------------

DEAD_RUN_REASON = "process ended without a status; killed?"


def mark_running(run_dir: Path) -> None:
    """Status `running`, with this process's pid and host and the start time (rank 0 only)."""
    now = time.time()
    _write_status(
        run_dir,
        {
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now,
            "updated": now,
        },
    )


def mark_ended(run_dir: Path, status: str, reason: str | None = None, steps: int | None = None) -> bool:
    """Record how this process's run ended; False (nothing written) when the status is not ours.

    Only the process that marked the run `running` may end it: a run refused before it started (a
    directory that holds another run) must not overwrite that run's status.
    """
    if status not in RUN_STATUSES or status == "running":
        raise ValueError(f"not an end status: {status!r}")
    current = _read_status_file(run_dir)
    if (
        current.get("status") != "running"
        or current.get("pid") != os.getpid()
        or current.get("host") != socket.gethostname()
    ):
        return False
    now = time.time()
    ended = {**current, "status": status, "updated": now, "ended": now}
    ended["duration_s"] = round(now - float(current.get("started", now)), 3)
    if reason:
        ended["reason"] = reason
    if steps is not None:
        ended["steps"] = steps
    try:
        _write_status(run_dir, ended)
    except OSError:  # a full disk must not hide why the run ended; readers then see a dead `running`
        return False
    return True


def failure_reason(exc: BaseException) -> str:
    """An exception as one line: its type (unless it is one of ours) and its message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    own = type(exc).__module__.startswith("tunesmith.")
    if isinstance(exc, MemoryError) or "out of memory" in message.lower():
        kind = "out of memory"
    else:
        kind = "" if own and message else type(exc).__name__
    text = f"{kind}: {message}" if kind and message else kind or message
    return text if len(text) <= 500 else text[:497] + "..."


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status; a `running` one whose process is gone reads as `failed` (with `stale: True`).

    A directory without status.json (a run from before statuses were recorded) reads as `finished`
    when run.json commits it and `unknown` otherwise.
    """
    current = _read_status_file(run_dir)
    if not current:
        return {"status": "finished" if (run_dir / RUN_INFO).is_file() else "unknown"}
    if current.get("status") == "running" and not _running_owner_alive(run_dir, current):
        return {**current, "status": "failed", "reason": DEAD_RUN_REASON, "stale": True}
    return current


def _running_owner_alive(run_dir: Path, status: dict[str, Any]) -> bool:
    """On this host: the pid lives and the run's lock is held. Elsewhere: the lock is held."""
    pid = status.get("pid")
    if status.get("host") == socket.gethostname():
        if not isinstance(pid, int) or not _pid_alive(pid):
            return False
        if pid == os.getpid():
            return True  # this process runs it (a lock probe from here would always succeed)
    held = _lock_held(run_dir)
    return held if held is not None else status.get("host") != socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_held(run_dir: Path) -> bool | None:
    """Whether some process holds the run's flock (None where that cannot be told).

    A shared, non-blocking probe released at once: the owner's exclusive lock refuses it."""
    try:
        import fcntl
    except ImportError:
        return None
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return None


def _read_status_file(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    write_text_atomic(run_dir / STATUS_FILE, json.dumps(status, indent=1))
