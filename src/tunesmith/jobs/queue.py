"""The job queue: each job is `python -m tunesmith train CONFIG` in a child process, with its state in
the database.

One thread runs the queue: it starts queued jobs oldest first while fewer than `max_jobs` run, tails
each running job's metrics and checkpoints into events, and settles a job when its child exits,
from the run's own status (finished, interrupted, failed) and what was asked of it (cancel, pause).
Stopping a child is the loop's Ctrl-C: SIGINT, so it finishes its step and checkpoints, then SIGKILL
for the whole process group after a grace period. Children run in their own session, so a Ctrl-C
meant for the server reaches only the server, which then stops them itself.

On start-up, a job the database still calls `running` belonged to a server that is gone: its child
(if it outlived the server) is stopped, and the job is marked failed with the reason, or queued
again to resume from its last checkpoint (`train.resume: auto`) when `resume_jobs` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.jobs.events import add_event, sync_checkpoints, sync_metrics
from tunesmith.jobs.store import Store, now
from tunesmith.training.run_dir import read_status

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running", "paused")
FINAL = ("succeeded", "failed", "cancelled")
DEFAULT_GRACE_S = 60.0
POLL_S = 0.25
LOG_TAIL_BYTES = 4000


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    kill_at: float | None = None
    log_path: Path = field(default_factory=Path)


class JobQueue:
    """Runs the database's queued jobs; `on_success(job)` makes a finished job's model servable and
    returns its name (raising when it cannot, which fails the job)."""

    def __init__(
        self,
        store: Store,
        on_success: Callable[[dict[str, Any]], str],
        max_jobs: int = 1,
        resume_jobs: bool = False,
        grace_s: float = DEFAULT_GRACE_S,
        python: str = sys.executable,
    ) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        self.store = store
        self.on_success = on_success
        self.max_jobs = max_jobs
        self.resume_jobs = resume_jobs
        self.grace_s = grace_s
        self.python = python
        self._children: dict[str, _Child] = {}
        self.lock = threading.RLock()  # held while a job starts or settles; the API's stops take it too
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self) -> JobQueue:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="tunesmith-jobs", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, then every child (checkpoint first); their jobs stay `running` in the
        database, so the next start applies the restart policy to them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            children = list(self._children.items())
            self._children.clear()
        for _, child in children:
            _stop_process(child.process.pid, child.process, self.grace_s)

    def wake(self) -> None:
        """Look at the queue now (a job was created, cancelled or resumed)."""
        self._wake.set()

    # -- what the API asks ----------------------------------------------------------------------------

    def request_stop(self, job_id: str, intent: str) -> None:
        """Ask a running job's child to stop (`cancel` or `pause`); it is settled when it exits."""
        with self.lock:
            child = self._children.get(job_id)
            if child is not None and child.kill_at is None:
                child.kill_at = time.monotonic() + self.grace_s
                _signal(child.process.pid, signal.SIGINT)
        self.wake()

    def child_pid(self, job_id: str) -> int | None:
        with self.lock:
            child = self._children.get(job_id)
            return child.process.pid if child is not None else None

    # -- the queue thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end the queue for good
                log.exception("job queue tick failed")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def tick(self) -> None:
        with self.lock:
            for job in self.store.select("jobs", "status = 'running'"):
                self._watch(job)
            running = len(self.store.select("jobs", "status = 'running'"))
            for job in self.store.select("jobs", "status = 'queued'"):
                if running >= self.max_jobs or self._stop.is_set():
                    break
                if self._launch(job):
                    running += 1

    def _watch(self, job: dict[str, Any]) -> None:
        child = self._children.get(job["id"])
        sync_metrics(self.store, job)
        sync_checkpoints(self.store, self.store.get("jobs", job["id"]) or job, job["fine_tuned_model"] or "")
        if child is None:
            return  # a job of a server that is gone: recover() settles those
        if child.kill_at is not None and time.monotonic() > child.kill_at and child.process.poll() is None:
            add_event(self.store, job["id"], "The job did not stop within the grace period; killed", "warn")
            _signal(child.process.pid, signal.SIGKILL, group=True)
        code = child.process.poll()
        if code is None:
            return
        del self._children[job["id"]]
        sync_metrics(self.store, self.store.get("jobs", job["id"]) or job)
        self._settle(self.store.get("jobs", job["id"]) or job, code, child.log_path)

    def _launch(self, job: dict[str, Any]) -> bool:
        logs = self.store.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{job['id']}.log"
        if not self.store.update_if("jobs", job["id"], ("queued",), status="running", stop_intent=None):
            return False
        resumed = _last_checkpoint_step(Path(job["run_dir"]))
        try:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(
                    [self.python, "-m", "tunesmith", "train", job["config_path"]],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
        except OSError as exc:
            self._fail(job, "job_start_failed", f"the training process could not start: {exc}")
            return False
        self.store.update("jobs", job["id"], pid=process.pid)
        self._children[job["id"]] = _Child(process, None, log_path)
        message = f"Fine-tuning job resumed from step {resumed}" if resumed else "Fine-tuning job started"
        add_event(self.store, job["id"], message)
        return True

    def _settle(self, job: dict[str, Any], code: int, log_path: Path) -> None:
        """The child exited: decide the job's end from the run's status and what was asked."""
        status = read_status(Path(job["run_dir"]))
        intent = job["stop_intent"]
        if intent == "cancel":
            self._end(job, "cancelled", "Fine-tuning job cancelled")
        elif intent == "pause":
            step = _last_checkpoint_step(Path(job["run_dir"]))
            where = f" at step {step}" if step else " (no checkpoint yet: it restarts from the beginning)"
            self.store.update("jobs", job["id"], status="paused", pid=None)
            add_event(self.store, job["id"], f"Fine-tuning job paused{where}")
        elif code == 0 and status.get("status") == "finished":
            self._succeed(job)
        else:
            reason = (
                status.get("reason") or _error_line(log_path) or f"the training process exited with {code}"
            )
            self._fail(job, "training_failed", reason)

    def _succeed(self, job: dict[str, Any]) -> None:
        try:
            name = self.on_success(job)
        except Exception as exc:
            log.exception("serving the model of %s failed", job["id"])
            self._fail(
                job, "model_not_served", f"training finished, but its model could not be served: {exc}"
            )
            return
        self.store.update("jobs", job["id"], fine_tuned_model=name)
        add_event(self.store, job["id"], f"New fine-tuned model created: {name}")
        self._end(job, "succeeded", "The job has successfully completed")

    def _end(self, job: dict[str, Any], status: str, message: str, level: str = "info") -> None:
        self.store.update("jobs", job["id"], status=status, finished_at=now(), pid=None, stop_intent=None)
        add_event(self.store, job["id"], message, level)

    def _fail(self, job: dict[str, Any], code: str, message: str) -> None:
        self.store.update("jobs", job["id"], error={"code": code, "message": message, "param": None})
        self._end(job, "failed", f"Fine-tuning job failed: {message}", "error")

    # -- start-up -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Settle the jobs a previous server left `running` (see the module docstring)."""
        for job in self.store.select("jobs", "status = 'running'"):
            pid = job["pid"]
            if pid and _is_our_child(pid, job["config_path"]):
                add_event(
                    self.store, job["id"], f"Stopping the training process {pid} left by the previous server"
                )
                _stop_process(pid, None, self.grace_s)
            sync_metrics(self.store, job)
            job = self.store.get("jobs", job["id"]) or job
            if job["stop_intent"] == "cancel":
                self._end(job, "cancelled", "Fine-tuning job cancelled")
            elif job["stop_intent"] == "pause" or self.resume_jobs:
                status = "paused" if job["stop_intent"] == "pause" else "queued"
                self.store.update("jobs", job["id"], status=status, pid=None)
                step = _last_checkpoint_step(Path(job["run_dir"]))
                where = (
                    f"its checkpoint at step {step}" if step else "the beginning (no checkpoint was saved)"
                )
                add_event(
                    self.store, job["id"], f"The server restarted while this job ran; it resumes from {where}"
                )
            else:
                self._fail(
                    job,
                    "server_restarted",
                    "the server stopped while this job was running; create the job again "
                    "(or start the server with --resume-jobs to resume such jobs from their last checkpoint)",
                )


def _last_checkpoint_step(run_dir: Path) -> int | None:
    from tunesmith.training.checkpoint import committed_checkpoints

    found = committed_checkpoints(run_dir / "checkpoints")
    return int(found[-1].name.removeprefix("step-")) if found else None


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)  # the child leads its own session, so its group id is its pid
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_process(pid: int, process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGINT (the loop checkpoints and exits), then SIGKILL for the group after `grace_s`."""
    _signal(pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL, group=True)
    if process is not None:
        process.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _is_our_child(pid: int, config_path: str) -> bool:
    """The pid is still a `tunesmith train` of this job's config (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            parts = handle.read().split(b"\0")
    except OSError:
        return False
    return config_path.encode() in parts and b"train" in parts


def _error_line(log_path: Path) -> str | None:
    """The child's last `error: ...` line (the CLI's one-line report of a user error), if any."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1][:500] if lines else None
