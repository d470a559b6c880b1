"""The FastAPI app: routes, the key check and access log, and every error in OpenAI's shape.

Bodies are read and validated by hand (`transport.read_json`, `schemas.parse`) rather than through
FastAPI's parameter binding, whose 422 `{"detail": [...]}` answers no OpenAI client understands.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tunesmith import __version__
from tunesmith.serve import formatting as fmt
from tunesmith.serve.adapters import ModelSet
from tunesmith.serve.chat_api import chat_completions
from tunesmith.serve.completions_api import completions
from tunesmith.serve.engine import Engine
from tunesmith.serve.errors import SERVER, APIError, for_status
from tunesmith.serve.middleware import GuardAndLog
from tunesmith.serve.prepare import served_model
from tunesmith.serve.settings import ServeSettings

if TYPE_CHECKING:
    from tunesmith.jobs.service import JobService

log = logging.getLogger(__name__)


def create_app(
    engine: Engine, models: ModelSet, settings: ServeSettings | None = None, jobs: JobService | None = None
) -> FastAPI:
    """`jobs`: the job service, which adds the Files and Fine-tuning APIs (`fine_tuning_api.py`)."""
    settings = settings or ServeSettings()
    if jobs is not None:
        from tunesmith.serve.ui_api import UI_OPEN_ROUTES

        settings = replace(settings, open_routes=settings.open_routes | UI_OPEN_ROUTES)
    app = FastAPI(title="tunesmith", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GuardAndLog, settings=settings)
    _add_error_handlers(app)

    def parent(name: str) -> str | None:
        return None if models.served[name].adapter is None else models.base_name

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "models": len(models.served), "active": engine.active}

    @app.get("/v1/models")
    async def list_models() -> dict[str, object]:
        cards = [fmt.model_card(m.name, m.created, parent(m.name)) for m in models.served.values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, object]:
        served = served_model(models, name)
        return fmt.model_card(served.name, served.created, parent(served.name))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completions(request, engine, models, settings)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        return await completions(request, engine, models, settings)

    if jobs is not None:
        from tunesmith.serve.fine_tuning_api import add_fine_tuning_routes

        add_fine_tuning_routes(app, jobs, settings)
        from tunesmith.serve.ui_api import add_ui_routes

        add_ui_routes(app, jobs, models, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"No route {request.method} {request.url.path}.", 405: "Method not allowed."}
        return for_status(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error: {type(exc).__name__}", SERVER).response()
