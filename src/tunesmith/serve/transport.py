"""What the chat and completions routes share: the body read under a size cap, starting a run with
the engine's refusals turned into HTTP errors, and an event-stream response that always cancels.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tunesmith.serve.engine import Engine, EngineBusy
from tunesmith.serve.errors import SERVER, APIError, bad_request, too_large
from tunesmith.serve.prepare import Prepared
from tunesmith.serve.runner import ClientGone, Run

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"; only ever logged


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body; 413 past `limit` bytes (checked before and while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise bad_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
            "invalid_json",
        ) from None


def start_run(engine: Engine, prepared: Prepared, request: Request) -> Run:
    served = prepared.served
    run = Run(engine, served.tokenizer, prepared.stop, served.adapter)
    try:
        run.start(prepared.jobs)
    except EngineBusy as exc:
        raise APIError(
            503, f"The server is busy ({exc}); retry shortly.", SERVER, None, "overloaded"
        ) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    note(request, run, prepared)
    return run


def note(request: Request, run: Run, prepared: Prepared) -> None:
    """What the access log line reports for this request (read by the middleware at the end)."""
    request.state.model = prepared.served.name
    request.state.usage = {"prompt": prepared.prompt_tokens, "completion": run.completion_tokens}
    request.state.ttft = run.first_token_s


class EventStream(StreamingResponse):
    """Server-sent events of one run; the run is cancelled however the response ends (done, client
    gone before the first byte, or mid-stream), so no generation outlives its listener."""

    def __init__(self, content: Any, run: Run) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def respond(
    request: Request,
    run: Run,
    prepared: Prepared,
    stream: bool,
    events: Callable[[], AsyncIterator[str]],
    collect: Callable[[], Awaitable[dict[str, Any]]],
) -> Response:
    """Stream the run's events, or wait for the whole body; a plain request's run always ends here."""
    if stream:
        return EventStream(events(), run)
    try:
        return JSONResponse(await collect())
    except ClientGone:
        request.state.disconnected = True
        return Response(status_code=CLIENT_CLOSED)
    finally:
        run.cancel()
        note(request, run, prepared)
