"""`tunesmith synth DOCS... --out data.jsonl`: question-answer training data from documents.

Parsing and printing only; the work is in `tunesmith.synth`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_synth_parser(sub: Any) -> None:
    p = sub.add_parser(
        "synth", help="build a question-answer dataset from documents with an OpenAI-compatible model"
    )
    p.add_argument("docs", nargs="+", help=".txt/.md/.html/.pdf/.docx files, folders or globs")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--config", help="YAML file with a top-level `synth:` section; flags override it")
    p.add_argument("--endpoint", help="base URL of the API, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name sent with each request")
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--format", choices=["openai", "sharegpt", "alpaca"], help="row format (default openai)")
    p.add_argument("--questions", type=int, dest="questions_per_chunk", help="questions per chunk")
    p.add_argument("--concurrency", type=int, help="requests in flight at once")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        help="chunk by tokens: at most N tokens a chunk (sets chunking.mode tokens)",
    )
    p.add_argument("--overlap", type=int, help="tokens shared by neighbouring chunks (with --chunk-tokens)")
    p.add_argument(
        "--tokenizer",
        help="whose tokens --chunk-tokens counts: 'default' (the default model) or a model folder",
    )
    p.add_argument(
        "--reasoning",
        choices=["off", "keep", "strip"],
        help="ask for a <think> block before each answer; keep writes it into the data, strip drops it",
    )
    p.add_argument(
        "--judge-threshold",
        type=float,
        help="rate each pair with a second request; keep scores >= this (1-5)",
    )
    p.add_argument("--cache-dir", help="cache of finished chunks (default: <out>.cache)")
    p.add_argument("--summary-json", help="also write the summary as JSON to this file")


def run_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        import httpx  # noqa: F401 - the client every request goes through
    except ImportError:
        print("synth: needs httpx: pip install 'tunesmith[synth]' (or pip install httpx)", file=sys.stderr)
        return 2
    from tunesmith.config.load import ConfigError
    from tunesmith.synth.client import ClientError
    from tunesmith.synth.config import load_synth_config
    from tunesmith.synth.pipeline import synthesize
    from tunesmith.synth.readers import ReaderError

    keys = (
        "endpoint",
        "model",
        "api_key_env",
        "format",
        "questions_per_chunk",
        "concurrency",
        "reasoning",
        "cache_dir",
    )
    overrides: dict[str, Any] = {k: getattr(args, k) for k in keys}
    overrides["chunking"] = {
        "mode": "tokens" if args.chunk_tokens is not None else None,
        "max_tokens": args.chunk_tokens,
        "overlap": args.overlap,
        "tokenizer": args.tokenizer,
    }
    overrides["judge"] = {"threshold": args.judge_threshold}
    try:
        cfg = load_synth_config(args.config, overrides)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"error: synth config: {exc}", file=sys.stderr)
        return 2
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            print(
                f"error: environment variable {cfg.api_key_env} is not set (it should hold the API key)",
                file=sys.stderr,
            )
            return 2
    try:
        summary = synthesize(args.docs, args.out, cfg, api_key=api_key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ReaderError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.text())
    print(f"wrote {summary.rows_kept} rows to {args.out}")
    if args.summary_json:
        Path(args.summary_json).write_text(summary.to_json() + "\n", encoding="utf-8")
    if summary.chunks and summary.chunks_skipped == summary.chunks:
        first = summary.skipped[0]["reason"] if summary.skipped else "unknown"
        print(
            f"error: every chunk was skipped (first reason: {first}); check --endpoint {cfg.endpoint} "
            f"and --model {cfg.model}",
            file=sys.stderr,
        )
        return 1
    return 0
