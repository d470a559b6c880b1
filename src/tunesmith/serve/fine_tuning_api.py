"""OpenAI's Files and Fine-tuning APIs over the job service (`tunesmith serve --storage DIR`).

Routes: `POST/GET /v1/files`, `GET/DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`,
`POST/GET /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs/{id}`, `POST .../cancel|pause|resume`,
`GET .../events`, `GET .../checkpoints`. Objects have the fields of the official `openai` package's
types (`FileObject`, `FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`); lists page
with `after`/`limit`/`has_more`, newest first. Query strings and bodies are read by hand, as in the
rest of the server, so every refusal is a 400 in OpenAI's shape rather than FastAPI's 422.

A finished job's model is served at once, as `ft:{base}:tunesmith:{suffix}:{id}`, by loading its
adapter into the running engine (`adapters.add_adapter`).
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tunesmith.jobs.events import checkpoint_model_name
from tunesmith.jobs.service import ORG, Base, JobService, ServiceError
from tunesmith.jobs.store import UnknownCursor
from tunesmith.models.default_model import DEFAULT_MODEL_NAME
from tunesmith.serve.adapters import ModelSet, add_adapter
from tunesmith.serve.errors import APIError, bad_request, too_large
from tunesmith.serve.settings import ServeSettings
from tunesmith.serve.transport import read_json

MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and the purpose field, beyond the file itself
MAX_PAGE = 100


def create_job_service(root: str | Path, engine: Any, models: ModelSet, **options: Any) -> JobService:
    """A job service whose jobs train the served base and whose results this server serves."""
    base = models.served[models.base_name]
    aliases = frozenset({"default"}) if models.base_name == DEFAULT_MODEL_NAME else frozenset()
    base_spec = Base(models.base_name, base.source, aliases)

    def serve_model(name: str, run_dir: Path) -> None:
        add_adapter(models, engine, name, run_dir)

    return JobService(Path(root), base_spec, serve_model, **options)


def add_fine_tuning_routes(app: FastAPI, service: JobService, settings: ServeSettings) -> None:
    @app.post("/v1/files")
    async def upload_file(request: Request) -> JSONResponse:
        fields = await _read_form(request, service.max_file_bytes + MULTIPART_OVERHEAD)
        upload = fields.get("file")
        if upload is None:
            raise bad_request("the form needs a `file` part holding the JSONL file", "file")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if not purpose:
            raise bad_request("the form needs a `purpose` field (fine-tune)", "purpose")
        row = await run_in_threadpool(_call, service.upload, upload[0] or "upload.jsonl", upload[1], purpose)
        return JSONResponse(file_object(row))

    @app.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be asc or desc, got {order!r}", "order")
        where, params = ("purpose = ?", (query["purpose"],)) if "purpose" in query else ("1", ())
        items, more = _page(service, "files", request, where, params, 10000, newest_first=order == "desc")
        return JSONResponse(_list([file_object(r) for r in items], more))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> JSONResponse:
        return JSONResponse(file_object(_call(service.file, file_id)))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> JSONResponse:
        _call(service.file, file_id)
        users = service.store.select(
            "jobs",
            "(training_file = ? OR validation_file = ?) AND status IN ('validating_files', 'queued', 'running', 'paused')",
            (file_id, file_id),
        )
        if users:
            raise bad_request(f"{file_id} is in use by job {users[0]['id']}; cancel it first", "file_id")
        _call(service.delete_file, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        row = _call(service.file, file_id)
        data = await run_in_threadpool(Path(row["path"]).read_bytes)
        return Response(data, media_type="application/octet-stream")

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> JSONResponse:
        body = await read_json(request, settings.max_body_bytes)
        job = await run_in_threadpool(_call, service.create_job, body)
        return JSONResponse(job_object(service, job))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request) -> JSONResponse:
        where, params = "1", ()
        for key, value in request.query_params.items():
            if key.startswith("metadata[") and key.endswith("]"):
                where += " AND json_extract(metadata, ?) = ?"
                params += (f'$."{key[9:-1]}"', value)
        items, more = _page(service, "jobs", request, where, params, 20)
        return JSONResponse(_list([job_object(service, r) for r in items], more))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(job_object(service, _call(service.job, job_id)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> JSONResponse:
        return JSONResponse(job_object(service, await run_in_threadpool(_call, service.cancel, job_id)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str) -> JSONResponse:
        return JSONResponse(job_object(service, await run_in_threadpool(_call, service.pause, job_id)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(job_id: str) -> JSONResponse:
        return JSONResponse(job_object(service, await run_in_threadpool(_call, service.resume, job_id)))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, request: Request) -> JSONResponse:
        _call(service.job, job_id)
        items, more = _page(service, "events", request, "job_id = ?", (job_id,), 20)
        return JSONResponse(_list([event_object(r) for r in items], more))

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, request: Request) -> JSONResponse:
        job = _call(service.job, job_id)
        items, more = _page(service, "checkpoints", request, "job_id = ?", (job_id,), 10)
        return JSONResponse(_list([checkpoint_object(job, r) for r in items], more))


# -- objects in OpenAI's shapes --------------------------------------------------------------------


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": row["status"],
        "status_details": row["status_details"],
        "expires_at": None,
    }


def job_object(service: JobService, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": {
            key: row["hyperparameters"][key] for key in ("n_epochs", "batch_size", "learning_rate_multiplier")
        },
        "model": row["model"],
        "organization_id": ORG,
        "result_files": [],
        "seed": row["seed"],
        "status": service.shown_status(row),
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": row["metadata"],
        "method": row["method"],
        "user_provided_suffix": row["suffix"],
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": row["data"] or {},
        "type": row["type"],
    }


def checkpoint_object(job: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    model = job["fine_tuned_model"] or f"ft:{job['model']}:{ORG}:{job['suffix'] or ''}:{job['id'][6:]}"
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": checkpoint_model_name(model, row["step_number"]),
        "fine_tuning_job_id": job["id"],
        "metrics": row["metrics"],
        "step_number": row["step_number"],
    }


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# -- request reading -------------------------------------------------------------------------------


def _call(function: Any, *args: Any) -> Any:
    """The service's refusals as OpenAI errors."""
    try:
        return function(*args)
    except ServiceError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None


def _page(
    service: JobService,
    table: str,
    request: Request,
    where: str,
    params: tuple[Any, ...],
    default_limit: int,
    newest_first: bool = True,
) -> tuple[list[dict[str, Any]], bool]:
    query = request.query_params
    raw = query.get("limit", str(default_limit))
    ceiling = max(MAX_PAGE, default_limit)
    if not raw.isdigit() or not 1 <= int(raw) <= ceiling:
        raise bad_request(f"limit must be an integer from 1 to {ceiling}, got {raw!r}", "limit")
    after = query.get("after") or None
    try:
        return service.store.page(
            table, where=where, params=params, after=after, limit=int(raw), newest_first=newest_first
        )
    except UnknownCursor:
        raise bad_request(f"after={after!r} names no item of this list", "after") from None


async def _read_form(request: Request, limit: int) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field: (filename or None, bytes)}, read under `limit` bytes.

    Parsed with the standard library's MIME parser: the server needs no multipart dependency.
    """
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("upload the file as multipart/form-data with fields `file` and `purpose`", "file")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    message = await run_in_threadpool(_parse_multipart, content_type, bytes(body))
    if not message.is_multipart():
        raise bad_request("the multipart body could not be read (check its boundary)", "file")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        fields[str(name)] = (part.get_filename(), payload)
    return fields


def _parse_multipart(content_type: str, body: bytes) -> Message:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    return BytesParser(policy=HTTP).parsebytes(head + body)
