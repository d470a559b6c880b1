"""The web UI at `/ui`: static files (no build step) and the few routes the OpenAI face lacks.

The page uses the OpenAI face for everything it has (files, jobs, cancel/pause/resume, events,
checkpoints, models, chat) and `/ui/api/...` for the rest, over the same job service:
- `GET /ui/api/info`: the base, the Train form (from the config schema) and its starting YAML;
- `POST /ui/api/jobs`: a job from an edited run config (`ui_jobs.create_ui_job`);
- `GET /ui/api/jobs`: the jobs with their progress (the Runs table);
- `GET /ui/api/jobs/{id}`: the job with its progress, resolved config and metrics (curves, compare);
- `GET /ui/api/jobs/{id}/stream`: its live view as server-sent events (`ui_events`);
- `GET /ui/api/jobs/{id}/log`: the log's tail;
- `POST /ui/api/data/preview`: an uploaded file's tokens and bad rows (`ui_data`);
- `GET/POST /ui/api/jobs/{id}/exports`: merge or GGUF exports with the behaviour check (`ui_export`).

The page and its static files are the only routes open without the API key (they hold no data);
the page asks for the key once and sends it as the bearer token on every call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response

from tunesmith.jobs.events import METRICS_FILE
from tunesmith.jobs.service import JobService, ServiceError
from tunesmith.serve.adapters import ModelSet
from tunesmith.serve.errors import APIError, bad_request
from tunesmith.serve.settings import ServeSettings
from tunesmith.serve.transport import read_json
from tunesmith.serve.ui_data import preview_file
from tunesmith.serve.ui_events import log_path, read_log, stream_job
from tunesmith.serve.ui_export import ExportRefused, list_exports, start_export
from tunesmith.serve.ui_jobs import UIJobError, create_ui_job, form_spec, starting_yaml

STATIC = Path(__file__).with_name("ui") / "static"
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css", "chart.js": "text/javascript"}
UI_OPEN_ROUTES = frozenset({"/ui", "/ui/", *(f"/ui/static/{name}" for name in STATIC_FILES)})
LOG_TAIL_BYTES = 16000
MAX_JOBS_LISTED = 200


def add_ui_routes(app: FastAPI, service: JobService, models: ModelSet, settings: ServeSettings) -> None:
    from tunesmith.serve.fine_tuning_api import job_object

    def describe(row: dict[str, Any]) -> dict[str, Any]:
        return {**job_object(service, row), "progress": _progress(row)}

    def job_row(job_id: str) -> dict[str, Any]:
        try:
            return service.job(job_id)
        except ServiceError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None

    @app.get("/ui")
    async def page() -> Response:
        return FileResponse(
            STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/ui/")
    async def page_slash() -> Response:
        return RedirectResponse("/ui")

    @app.get("/ui/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise APIError(404, f"No UI file {name!r}.", code="not_found")
        return FileResponse(
            STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"}
        )

    @app.get("/ui/api/info")
    async def info() -> JSONResponse:
        base = service.base
        return JSONResponse(
            {
                "base": base.name,
                "base_names": sorted({base.name, *base.aliases}),
                "served": list(models.served),
                "form": form_spec(),
                "yaml": starting_yaml(service),
                "defaults": service.defaults,
                "max_file_bytes": service.max_file_bytes,
                "key_required": bool(settings.api_key),
            }
        )

    @app.post("/ui/api/jobs")
    async def create(request: Request) -> JSONResponse:
        body = await read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("yaml"), str):
            raise bad_request('send {"yaml": "<run config>", "suffix": "..."}', "yaml")
        suffix = body.get("suffix") or None
        try:
            row = await run_in_threadpool(create_ui_job, service, body["yaml"], suffix)
        except UIJobError as exc:
            raise bad_request(str(exc), exc.param) from None
        except ServiceError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        return JSONResponse(describe(row))

    @app.get("/ui/api/jobs")
    async def jobs() -> JSONResponse:
        """Newest first, with progress: the Runs table (the same rows `/v1/fine_tuning/jobs` lists)."""
        rows, more = service.store.page("jobs", limit=MAX_JOBS_LISTED)
        return JSONResponse(
            {"data": await run_in_threadpool(lambda: [describe(r) for r in rows]), "has_more": more}
        )

    @app.get("/ui/api/jobs/{job_id}")
    async def job_detail(job_id: str) -> JSONResponse:
        row = job_row(job_id)
        config = await run_in_threadpool(_read_text, Path(row["config_path"]))
        metrics = await run_in_threadpool(_metrics, Path(row["run_dir"]))
        return JSONResponse({**describe(row), "config_yaml": config, "metrics": metrics})

    @app.get("/ui/api/jobs/{job_id}/stream")
    async def job_stream(job_id: str, request: Request) -> Response:
        job_row(job_id)
        raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        if not raw.isdigit():
            raise bad_request(f"after must be an event number, got {raw!r}", "after")
        return stream_job(service, job_id, request, describe, int(raw))

    @app.get("/ui/api/jobs/{job_id}/log")
    async def job_log(job_id: str) -> JSONResponse:
        job_row(job_id)
        text, _ = await run_in_threadpool(read_log, log_path(service, job_id), -LOG_TAIL_BYTES)
        return JSONResponse({"text": text})

    @app.post("/ui/api/data/preview")
    async def data_preview(request: Request) -> JSONResponse:
        body = await read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("file_id"), str):
            raise bad_request('send {"file_id": "file-...", "method": "sft", "seq_len": 1024}', "file_id")
        try:
            row = service.file(body["file_id"])
        except ServiceError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        method = body.get("method", "sft")
        seq_len = body.get("seq_len", 1024)
        n = body.get("n", 5)
        if method not in ("sft", "dpo"):
            raise bad_request(f"method must be sft or dpo, got {method!r}", "method")
        for key, value in (("seq_len", seq_len), ("n", n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad_request(f"{key} must be a positive whole number, got {value!r}", key)
        tokenizer = models.served[models.base_name].tokenizer
        result = await run_in_threadpool(
            preview_file, row, tokenizer, method, seq_len, bool(body.get("train_on_prompt")), n
        )
        return JSONResponse(result)

    @app.get("/ui/api/jobs/{job_id}/exports")
    async def exports(job_id: str) -> JSONResponse:
        job_row(job_id)
        return JSONResponse({"data": await run_in_threadpool(list_exports, service.root, job_id)})

    @app.post("/ui/api/jobs/{job_id}/exports")
    async def export(job_id: str, request: Request) -> JSONResponse:
        row = job_row(job_id)
        body = await read_json(request, settings.max_body_bytes)
        if not isinstance(body, dict):
            raise bad_request('send {"kind": "merge"} or {"kind": "gguf", "gguf_type": "f16"}', "kind")
        try:
            record = await run_in_threadpool(
                start_export,
                service.root,
                row,
                str(body.get("kind", "")),
                str(body.get("gguf_type", "f16")),
                bool(body.get("verify", True)),
            )
        except ExportRefused as exc:
            raise bad_request(str(exc), "kind") from None
        return JSONResponse(record)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics lines (step, loss, eval_loss, ...), for the curves and the comparison."""
    rows = []
    try:
        lines = (run_dir / METRICS_FILE).read_bytes().splitlines()
    except OSError:
        return rows
    for raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            rows.append({k: v for k, v in record.items() if isinstance(v, int | float)})
    return rows


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    """How far the job is: the last logged step against the config's step budget or epochs."""
    if row["status"] == "succeeded":
        return {"fraction": 1.0}
    config = _load_config(Path(row["config_path"]))
    train = config.get("train") or {}
    last = _last_metrics(Path(row["run_dir"]))
    if not last:
        return {"fraction": 0.0}
    step, epoch = last.get("step", 0), last.get("epoch")
    fraction = 0.0
    if train.get("max_steps"):
        fraction = step / float(train["max_steps"])
    if epoch is not None and train.get("epochs"):
        fraction = max(fraction, float(epoch) / float(train["epochs"]))
    return {"fraction": min(fraction, 1.0), "step": step, "epoch": epoch, "max_steps": train.get("max_steps")}


def _load_config(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last complete line of metrics.jsonl, read from the file's end."""
    try:
        with open(run_dir / METRICS_FILE, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 4096))
            lines = handle.read().splitlines()
    except OSError:
        return {}
    for raw in reversed(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return record
    return {}
