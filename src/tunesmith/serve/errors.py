"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Clients (the official SDKs among them) read `error.message` and branch on the status code; a bare
500, FastAPI's `{"detail": ...}` or a dropped connection gives them nothing to show. Every failure
the server can foresee is raised as `APIError`; the app's handlers turn the rest into this shape too.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

INVALID = "invalid_request_error"
SERVER = "server_error"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type: str = INVALID, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID, param, code)


def model_not_found(name: str, available: list[str]) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist on this server; available: {', '.join(sorted(available))}",
        INVALID,
        "model",
        "model_not_found",
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key; send the header `Authorization: Bearer <key>`.",
        INVALID,
        None,
        "invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        INVALID,
        None,
        "request_too_large",
    )


STATUS_TYPES = {401: INVALID, 404: INVALID, 405: INVALID, 413: INVALID, 429: "rate_limit_error"}


def for_status(status: int, message: str) -> APIError:
    """An APIError for a status Starlette raised itself (unknown route, wrong method)."""
    return APIError(status, message, STATUS_TYPES.get(status, SERVER if status >= 500 else INVALID))
