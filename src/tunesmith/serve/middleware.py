"""The one layer every request passes: the API key check, then one log line when it is done.

Pure ASGI (not Starlette's BaseHTTPMiddleware, which buffers streams through a second task and
hides client disconnects from the endpoint). The key is compared with `hmac.compare_digest`, in
constant time, so response timing does not leak how much of a guess was right.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from tunesmith.serve.errors import unauthorized
from tunesmith.serve.settings import ServeSettings

access_log = logging.getLogger("tunesmith.serve.access")

Scope = dict[str, Any]


class GuardAndLog:
    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: list[int] = []

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        state = scope.setdefault("state", {})
        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_and_note)
            else:
                await unauthorized().response()(scope, receive, send_and_note)
        finally:
            self._log(scope, status[0] if status else 499, state, time.monotonic() - started)

    def _authorized(self, scope: Scope) -> bool:
        key = self.settings.api_key
        if not key or scope["path"] in self.settings.open_routes:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode("utf-8"))

    @staticmethod
    def _log(scope: Scope, status: int, state: dict[str, Any], seconds: float) -> None:
        usage = state.get("usage")
        parts = [scope["method"], scope["path"], str(status)]
        if state.get("model"):
            parts.append(f"model={state['model']}")
        if usage is not None:
            parts.append(f"tokens={usage['prompt']}+{usage['completion']}")
        if state.get("ttft") is not None:
            parts.append(f"ttft={state['ttft']:.3f}s")
        if state.get("disconnected"):
            parts.append("client-disconnected")
        parts.append(f"{seconds:.3f}s")
        access_log.info(" ".join(parts))
