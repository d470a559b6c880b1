"""A job's live view as server-sent events: `GET /ui/api/jobs/{id}/stream`.

Everything comes from the job service's database and the job's log file, so a page that reconnects
(a reload, a dropped connection) asks again from where it was and misses nothing: the SSE `id` is the
event's row number, and `Last-Event-ID` (or `?after=`) resumes after it. Messages:
- `job`: the job object (as `/v1/fine_tuning/jobs/{id}` gives it) with `progress`, when it changes;
- `event`: one job event (a message or a `metrics` event with the step's losses), oldest first;
- `log`: new text of the training process's log (the last `LOG_START_BYTES` on connect);
- `end`: the job reached a final state and every event was sent; the stream closes.

The page reads the stream with `fetch` (not `EventSource`, which cannot send the bearer token).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from tunesmith.jobs.queue import FINAL
from tunesmith.jobs.service import JobService

POLL_S = 0.3
HEARTBEAT_S = 15.0
LOG_START_BYTES = 8000
BATCH = 500  # events sent per poll at most (a long run's history arrives in a few rounds)


def sse(kind: str, data: Any, id: int | None = None) -> bytes:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def log_path(service: JobService, job_id: str) -> Path:
    return service.store.root / "logs" / f"{job_id}.log"


def read_log(path: Path, offset: int) -> tuple[str, int]:
    """New complete text of the log from `offset` (a negative one: that many bytes from the end)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size + offset) if offset < 0 else min(offset, size)
            handle.seek(start)
            chunk = handle.read()
    except FileNotFoundError:
        return "", max(offset, 0)
    return chunk.decode("utf-8", "replace"), start + len(chunk)


def stream_job(
    service: JobService,
    job_id: str,
    request: Request,
    describe: Any,
    after: int = 0,
) -> StreamingResponse:
    """`describe(job_row)` gives the job object the page shows (the API's shape plus progress)."""

    async def messages() -> AsyncIterator[bytes]:
        seen_seq = after
        log_offset = -LOG_START_BYTES
        last_job: str | None = None
        idle = 0.0
        yield b"retry: 1000\n\n"
        while True:
            row = service.store.get("jobs", job_id)
            if row is None:
                yield sse("end", {"reason": "the job no longer exists"})
                return
            job = describe(row)
            text = json.dumps(job, sort_keys=True)
            if text != last_job:
                last_job = text
                yield sse("job", job)
            events, _ = service.store.page(
                "events",
                where="job_id = ? AND seq > ?",
                params=(job_id, seen_seq),
                limit=BATCH,
                newest_first=False,
            )
            for event in events:
                seen_seq = event["seq"]
                yield sse("event", _event(event), id=event["seq"])
            chunk, log_offset = read_log(log_path(service, job_id), log_offset)
            if chunk:
                yield sse("log", {"text": chunk})
            if row["status"] in FINAL and len(events) < BATCH:
                yield sse("end", {"status": row["status"]})
                return
            if events or chunk:
                idle = 0.0
            else:
                idle += POLL_S
                if idle >= HEARTBEAT_S:
                    idle = 0.0
                    yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(messages(), media_type="text/event-stream", headers=headers)


def _event(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "seq": row["seq"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": row["data"] or {},
    }
