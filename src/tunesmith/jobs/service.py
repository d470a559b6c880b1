"""The job service: files, jobs and their queue over one storage root, for the HTTP faces to call.

It knows nothing of HTTP; refusals are `ServiceError(status, message, param, code)` that the API
turns into OpenAI's error shape. A job is persisted before anything can go wrong with it, and every
later problem ends the job `failed` with a reason instead of failing the request.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config.load import ConfigError
from tunesmith.jobs import files as job_files
from tunesmith.jobs.config import RequestError, build_config, model_name, parse_request
from tunesmith.jobs.events import add_event
from tunesmith.jobs.queue import ACTIVE, DEFAULT_GRACE_S, FINAL, JobQueue
from tunesmith.jobs.store import Store, new_id, now

log = logging.getLogger(__name__)

ORG = "tunesmith"


class ServiceError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class Base:
    """The base every job trains on: the one the server has loaded, so the result can be served."""

    name: str  # the served name, and the `{base}` of `ft:{base}:...`
    path: str  # the model directory training reads
    aliases: frozenset[str] = field(default_factory=frozenset)  # e.g. `default` for the embedded model


class JobService:
    def __init__(
        self,
        root: Path,
        base: Base,
        serve_model: Callable[[str, Path], None],
        *,
        max_jobs: int = 1,
        resume_jobs: bool = False,
        defaults: dict[str, Any] | None = None,
        max_file_bytes: int = job_files.DEFAULT_MAX_FILE_BYTES,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        """serve_model(name, run_dir) makes a finished run's model answer under `name`."""
        self.root = Path(root).expanduser().resolve()
        self.store = Store(self.root)
        self.base = base
        self.serve_model = serve_model
        self.defaults = defaults or {}
        self.max_file_bytes = max_file_bytes
        self.queue = JobQueue(self.store, self._on_success, max_jobs, resume_jobs, grace_s)

    def start(self) -> JobService:
        """Serve the models of jobs that succeeded before, then run the queue."""
        for job in self.store.select("jobs", "status = 'succeeded' AND fine_tuned_model IS NOT NULL"):
            try:
                self.serve_model(job["fine_tuned_model"], Path(job["run_dir"]))
            except Exception as exc:  # a deleted run dir must not stop the server
                log.warning("not serving %s: %s", job["fine_tuned_model"], exc)
        self.queue.start()
        return self

    def close(self) -> None:
        self.queue.close()
        self.store.close()

    # -- files ---------------------------------------------------------------------------------------

    def upload(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        try:
            return job_files.save_upload(self.store, filename, data, purpose, self.max_file_bytes)
        except job_files.FileRefused as exc:
            raise ServiceError(400, str(exc), exc.param) from None

    def file(self, file_id: str) -> dict[str, Any]:
        row = self.store.get("files", file_id)
        if row is None:
            raise ServiceError(404, f"No such File object: {file_id}", "id", "file_not_found")
        return row

    def delete_file(self, file_id: str) -> None:
        self.file(file_id)
        job_files.delete_file(self.store, file_id)

    # -- jobs ----------------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any]:
        row = self.store.get("jobs", job_id)
        if row is None:
            raise ServiceError(
                404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found"
            )
        return row

    def create_job(self, body: Any, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the request (400s), persist the job, then validate its data: from here on, every
        problem is the job's (`failed` with a reason), never the request's.

        `settings`: a partial run config for this job alone, over the service's defaults and under
        the request's own fields (the web UI's edited YAML)."""
        try:
            request = parse_request(body)
        except RequestError as exc:
            raise ServiceError(400, str(exc), exc.param) from None
        if request.model not in {self.base.name, self.base.path, *self.base.aliases}:
            known = ", ".join(sorted({self.base.name, *self.base.aliases}))
            raise ServiceError(
                400,
                f"model {request.model!r} cannot be fine-tuned here: this server fine-tunes the base it "
                f"serves ({known}); start `tunesmith serve` on another base to fine-tune that one",
                "model",
                "model_not_available",
            )
        training = self._job_file(request.training_file, "training_file")
        validation = (
            self._job_file(request.validation_file, "validation_file") if request.validation_file else None
        )
        job_id = new_id("ftjob-")
        run_dir = self.root / "runs" / job_id
        config_path = self.root / "jobs" / f"{job_id}.yaml"
        try:
            resolved = build_config(
                request,
                self.base.path,
                training["path"],
                validation["path"] if validation else None,
                str(run_dir),
                training["examples"],
                merge_settings(self.defaults, settings or {}),
            )
        except ConfigError as exc:
            raise ServiceError(400, f"this job cannot run: {exc}", None, "invalid_job") from None
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(resolved.config, sort_keys=False), encoding="utf-8")
        job = self.store.insert(
            "jobs",
            {
                "id": job_id,
                "created_at": now(),
                "model": self.base.name,
                "training_file": training["id"],
                "validation_file": validation["id"] if validation else None,
                "method": resolved.method,
                "hyperparameters": resolved.hyperparameters,
                "seed": resolved.seed,
                "suffix": request.suffix,
                "metadata": request.metadata,
                "status": "validating_files",
                "run_dir": str(run_dir),
                "config_path": str(config_path),
            },
        )
        add_event(self.store, job_id, f"Created fine-tuning job: {job_id}")
        problem = self._data_problem(request.method_type(), training, validation)
        if problem is not None:
            code, message, param = problem
            self.store.update(
                "jobs",
                job_id,
                status="failed",
                finished_at=now(),
                error={"code": code, "message": message, "param": param},
            )
            add_event(self.store, job_id, f"Fine-tuning job failed: {message}", "error")
        else:
            add_event(self.store, job_id, "Files validated, moving job to queued state")
            self.store.update_if("jobs", job_id, ("validating_files",), status="queued")
            self.queue.wake()
        return self.store.get("jobs", job["id"]) or job

    def _job_file(self, file_id: str | None, param: str) -> dict[str, Any]:
        row = self.store.get("files", file_id or "")
        if row is None:
            raise ServiceError(400, f"invalid {param}: {file_id} (no such file)", param, "invalid_file")
        if row["purpose"] != "fine-tune":
            raise ServiceError(400, f"invalid {param}: {file_id} was not uploaded for fine-tuning", param)
        return row

    @staticmethod
    def _data_problem(
        method: str, training: dict[str, Any], validation: dict[str, Any] | None
    ) -> tuple[str, str, str] | None:
        """OpenAI's job errors for a file that cannot train: (code, message, param)."""
        for row, param in ((training, "training_file"), (validation, "validation_file")):
            if row is None:
                continue
            if row["status"] != "processed":
                return f"invalid_{param}", f"{param} {row['id']} is not valid: {row['status_details']}", param
            wanted = "pairs" if method == "dpo" else "conversations"
            if row["kind"] != wanted:
                need = (
                    "preference pairs (input, preferred_output, non_preferred_output)"
                    if wanted == "pairs"
                    else ("conversations (messages with an assistant answer)")
                )
                return f"invalid_{param}", f"{param} {row['id']}: method {method} needs {need}", param
        if training["examples"] < job_files.MIN_EXAMPLES:
            return (
                "invalid_n_examples",
                f"Training file has {training['examples']} example(s), but must have at least "
                f"{job_files.MIN_EXAMPLES} examples",
                "training_file",
            )
        return None

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._stop(job_id, "cancel")

    def pause(self, job_id: str) -> dict[str, Any]:
        return self._stop(job_id, "pause")

    def _stop(self, job_id: str, intent: str) -> dict[str, Any]:
        job = self.job(job_id)
        allowed = (
            ("validating_files", "queued", "running", "paused")
            if intent == "cancel"
            else ("queued", "running")
        )
        if job["status"] not in allowed:
            raise ServiceError(
                400,
                f"Cannot {intent} a job that is {job['status']}.",
                "fine_tuning_job_id",
                "invalid_job_state",
            )
        with self.queue.lock:  # no start or settle of this job in between
            job = self.job(job_id)
            if job["status"] == "running":
                self.store.update("jobs", job_id, stop_intent=intent)
                add_event(
                    self.store, job_id, f"{intent.capitalize()} requested; the job checkpoints and stops"
                )
                self.queue.request_stop(job_id, intent)
            elif intent == "cancel" and job["status"] in ("validating_files", "queued", "paused"):
                self.store.update("jobs", job_id, status="cancelled", finished_at=now())
                add_event(self.store, job_id, "Fine-tuning job cancelled")
            elif intent == "pause" and job["status"] == "queued":
                self.store.update("jobs", job_id, status="paused")
                add_event(self.store, job_id, "Fine-tuning job paused before it started")
        return self.job(job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        if job["status"] != "paused":
            message = (
                "The job is still stopping; resume it once it is paused."
                if job["status"] == "running" and job["stop_intent"] == "pause"
                else f"Cannot resume a job that is {job['status']}; only paused jobs resume."
            )
            raise ServiceError(400, message, "fine_tuning_job_id", "invalid_job_state")
        if self.store.update_if("jobs", job_id, ("paused",), status="queued"):
            add_event(self.store, job_id, "Fine-tuning job resumed; queued")
            self.queue.wake()
        return self.job(job_id)

    def shown_status(self, job: dict[str, Any]) -> str:
        """A running job asked to stop is shown as what it becomes (OpenAI answers cancel so)."""
        if job["status"] == "running" and job["stop_intent"] == "cancel":
            return "cancelled"
        return job["status"]

    def _on_success(self, job: dict[str, Any]) -> str:
        name = model_name(self.base.name, ORG, job["suffix"], job["id"])
        self.serve_model(name, Path(job["run_dir"]))
        return name


__all__ = ["ACTIVE", "FINAL", "Base", "JobService", "ServiceError"]


def merge_settings(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `under`, section by section (neither is changed)."""
    out = copy.deepcopy(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
