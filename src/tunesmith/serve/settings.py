"""The server's limits and switches, in one place, with the defaults `tunesmith serve` uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None  # every route but /health needs `Authorization: Bearer <api_key>`
    max_tokens: int = 4096  # cap on max_tokens / max_completion_tokens (and the default, within the context)
    max_n: int = 8  # cap on `n` (choices per prompt)
    max_prompts: int = 32  # cap on the prompts of one /v1/completions request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    open_routes: frozenset[str] = frozenset({"/health"})  # the only routes without the key
