"""`tunesmith serve MODEL_OR_RUN_DIR [--adapter NAME=RUN_DIR ...] [--storage DIR]`: the OpenAI-compatible
HTTP server; with `--storage` also the job service (OpenAI's Files and Fine-tuning APIs).

Parsing and start-up only; the engine, the models and the app live in `tunesmith.serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tunesmith.serve.server import DEFAULT_HOST

DEFAULT_UI_STORAGE = "./tunesmith-data"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a model and LoRA adapters over an OpenAI-compatible HTTP API")
    serve.add_argument("model", help="a run directory, a model directory, a .gguf file, or 'default'")
    _add_serve_options(serve, storage_default=None)


def add_ui_parser(sub: Any) -> None:
    ui = sub.add_parser(
        "ui", help="the web UI: `serve` with the job service on and the page opened in a browser"
    )
    ui.add_argument(
        "model",
        nargs="?",
        default="default",
        help="the base jobs fine-tune and the server serves (default: 'default', the embedded model)",
    )
    _add_serve_options(ui, storage_default=DEFAULT_UI_STORAGE)
    ui.add_argument("--no-browser", action="store_true", help="do not open a browser at the page")


def _add_serve_options(serve: Any, storage_default: str | None) -> None:
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="also serve this LoRA run (or PEFT adapter directory) as model NAME; repeatable",
    )
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("TUNESMITH_API_KEY"),
        help="require `Authorization: Bearer KEY` on every route but /health (default: $TUNESMITH_API_KEY)",
    )
    serve.add_argument("--name", help="the name the base model is served under (default: its directory name)")
    serve.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (default fp32)"
    )
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    serve.add_argument(
        "--max-context", type=int, help="cap on prompt + completion tokens (default: the model's)"
    )
    serve.add_argument(
        "--max-tokens", type=int, default=4096, help="cap on max_tokens per request (default 4096)"
    )
    serve.add_argument("--max-n", type=int, default=8, help="cap on n per request (default 8)")
    serve.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default 1 MiB)"
    )
    jobs = serve.add_argument_group("job service (fine-tuning over OpenAI's Files and Fine-tuning APIs)")
    jobs.add_argument(
        "--storage",
        metavar="DIR",
        default=storage_default,
        help="turn the job service on (and the web UI at /ui), keeping files, jobs and runs under DIR"
        + (f" (default {storage_default})" if storage_default else ""),
    )
    jobs.add_argument("--max-jobs", type=int, default=1, help="jobs that train at the same time (default 1)")
    jobs.add_argument(
        "--resume-jobs",
        action="store_true",
        help="on start-up, resume jobs the last server left running from their last checkpoint "
        "(default: mark them failed)",
    )
    jobs.add_argument(
        "--job-defaults",
        metavar="YAML",
        help="a partial run config under every job's settings (e.g. data.seq_len, train.max_steps)",
    )
    jobs.add_argument(
        "--max-file-bytes", type=int, default=64 << 20, help="cap on an uploaded file (default 64 MiB)"
    )


def parse_adapters(items: list[str]) -> list[tuple[str, str]]:
    from tunesmith.config.load import ConfigError

    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                f"--adapter {item!r}: expected NAME=RUN_DIR, e.g. --adapter support=runs/support"
            )
        pairs.append((name, path))
    return pairs


def run_ui(args: argparse.Namespace) -> int:
    """`serve` with storage, bound to this machine unless an API key guards it, and a browser opened."""
    from tunesmith.config.load import ConfigError

    if not args.api_key and args.host not in LOCAL_HOSTS:
        raise ConfigError(
            f"--host {args.host}: the UI without an API key binds to 127.0.0.1 only; "
            "set --api-key (or $TUNESMITH_API_KEY) to open it to other machines"
        )
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/ui"
    if args.no_browser or not _has_display():
        print(f"web UI: {url}", flush=True)
    else:
        _open_when_up(url)
    return run_serve(args)


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_when_up(url: str) -> None:
    """Open the page once the server answers (model loading can take a while)."""
    import threading
    import time
    import urllib.request
    import webbrowser

    def wait_and_open() -> None:
        health = url.removesuffix("/ui") + "/health"
        for _ in range(600):
            try:
                with urllib.request.urlopen(health, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            return
        print(f"web UI: {url} (opening a browser)", flush=True)
        webbrowser.open(url)

    threading.Thread(target=wait_and_open, name="tunesmith-open-browser", daemon=True).start()


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from tunesmith.config.load import ConfigError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(
            'tunesmith serve needs fastapi and uvicorn: pip install "tunesmith[serve]"'
        ) from None
    from tunesmith.serve.adapters import load_model_set
    from tunesmith.serve.app import create_app
    from tunesmith.serve.engine import Engine
    from tunesmith.serve.server import serve_forever
    from tunesmith.serve.settings import ServeSettings

    for flag in ("max_batch", "max_tokens", "max_n", "max_body_bytes", "max_jobs", "max_file_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    _log_requests()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    models = load_model_set(args.model, parse_adapters(args.adapter), dtype, args.name, args.max_context)
    engine = Engine(models.model, max_context=models.context_length, max_batch=args.max_batch)
    settings = ServeSettings(
        api_key=args.api_key or None,
        max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
    )
    jobs = _job_service(args, engine, models)
    app = create_app(engine, models, settings, jobs)
    names = ", ".join(models.served)
    print(
        f"serving {names} at http://{args.host}:{args.port}/v1 (context {models.context_length} tokens)",
        flush=True,
    )
    if not settings.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: {args.host} is reachable from other machines and no --api-key is set", file=sys.stderr
        )
    if jobs is not None:
        print(f"job service: storage {jobs.root}, {args.max_jobs} job(s) at a time", flush=True)
    try:
        serve_forever(app, args.host, args.port)
    finally:
        if jobs is not None:
            jobs.close()
        engine.close()
    return 0


def _job_service(args: argparse.Namespace, engine: Any, models: Any) -> Any:
    """The job service when --storage is given, started (its earlier jobs' models served again)."""
    from tunesmith.config.load import ConfigError

    if not args.storage:
        for flag in ("resume_jobs", "job_defaults"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag.replace('_', '-')} needs --storage DIR (the job service)")
        return None
    from tunesmith.serve.fine_tuning_api import create_job_service

    defaults: dict[str, Any] = {}
    if args.job_defaults:
        import yaml

        try:
            with open(args.job_defaults, encoding="utf-8") as handle:
                defaults = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--job-defaults {args.job_defaults}: {exc}") from None
        if not isinstance(defaults, dict):
            raise ConfigError(f"--job-defaults {args.job_defaults}: expected a mapping of config sections")
    service = create_job_service(
        args.storage,
        engine,
        models,
        max_jobs=args.max_jobs,
        resume_jobs=args.resume_jobs,
        defaults=defaults,
        max_file_bytes=args.max_file_bytes,
    )
    return service.start()


def _log_requests() -> None:
    """One line per request on stderr, whatever the CLI's log level for everything else."""
    logger = logging.getLogger("tunesmith.serve.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
