"""Command line: parsing and dispatch only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from tunesmith import __version__

if TYPE_CHECKING:
    from tunesmith.config.schema import RunConfig


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune language models.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="path to a YAML config")
    train.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 output.dir=/tmp/run"
    )
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine (data parallel; one GPU each where there are GPUs)",
    )

    chat = sub.add_parser("chat", help="chat with a model or a finished run")
    chat.add_argument("model", help="a run directory, a model directory, a .gguf file, or 'default'")
    chat.add_argument("--prompt", help="answer this one prompt and exit")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    from tunesmith.cli.export_cmd import add_export_parser

    add_export_parser(sub)

    sub.add_parser("config-schema", help="print the JSON Schema of the config")
    from tunesmith.cli.data_cmd import add_data_parser

    add_data_parser(sub)
    from tunesmith.cli.score_cmd import add_score_parser

    add_score_parser(sub)
    from tunesmith.cli.runs_cmd import add_runs_parser

    add_runs_parser(sub)
    from tunesmith.cli.serve_cmd import add_serve_parser, add_ui_parser

    add_serve_parser(sub)
    add_ui_parser(sub)
    from tunesmith.cli.synth_cmd import add_synth_parser

    add_synth_parser(sub)
    from tunesmith.cli.eval_cmd import add_eval_parser

    add_eval_parser(sub)
    from tunesmith.cli.cache_cmd import add_cache_parser

    add_cache_parser(sub)
    from tunesmith.cli.estimate_cmd import add_estimate_parser

    add_estimate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and args.command in ("train", "data", "estimate")
        and all("=" in item and not item.startswith("-") for item in extra)
    ):
        args.overrides = list(args.overrides) + extra  # overrides may follow flags: train cfg --resume k=v
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    from tunesmith.cli.quiet import quiet_libraries

    quiet_libraries(args.verbose)
    handler = {
        "train": _train,
        "chat": _chat,
        "export": _export,
        "config-schema": _schema,
        "data": _data,
        "score": _score,
        "runs": _runs,
        "serve": _serve,
        "ui": _ui,
        "synth": _synth,
        "eval": _eval,
        "cache": _cache,
        "estimate": _estimate,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, the trace only with -v
        if args.verbose or not _is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    from tunesmith.config.load import ConfigError
    from tunesmith.data.errors import DataError
    from tunesmith.models.default_model import DefaultModelMissing
    from tunesmith.models.gguf_cache import InvalidGGUF
    from tunesmith.models.load import ModelNotFound
    from tunesmith.serve.adapters import ServeSetupError
    from tunesmith.training.loop import TrainingDiverged
    from tunesmith.training.run_dir import RunDirError

    return isinstance(
        exc,
        ConfigError
        | DataError
        | ModelNotFound
        | DefaultModelMissing
        | InvalidGGUF
        | ServeSetupError
        | RunDirError
        | TrainingDiverged
        | FileNotFoundError,
    )


def _train(args: argparse.Namespace) -> int:
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import resume_command, train

    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    _check_attention(cfg)
    if os.environ.get("RANK", "0") == "0":
        _print_estimate(cfg)
    if args.processes != 1:
        from tunesmith.config.load import ConfigError
        from tunesmith.training.launch import RankFailed, check_processes, launch_train

        try:
            check_processes(args.processes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            result = launch_train(cfg, args.processes)
        except RankFailed as exc:
            if args.verbose:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        result = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch only rank 0 reports
        return 0
    if result.interrupted:
        # The run's own config.yaml holds every override; the user's YAML alone would resume another run.
        print(f"stopped at step {result.steps}; resume with: {resume_command(result.run_dir)}")
        return 130
    print(f"done: {result.steps} steps; run directory {result.run_dir}")
    return 0


def _check_attention(cfg: RunConfig) -> None:
    """Refuse an attention kernel this machine cannot train with before the run directory is touched."""
    import torch

    from tunesmith.config.load import ConfigError
    from tunesmith.models.attention import choose_attention

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        choose_attention(cfg.train.attention, device_type)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _chat(args: argparse.Namespace) -> int:
    from tunesmith.infer.chat import run_chat

    return run_chat(
        args.model,
        prompt=args.prompt,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )


def _export(args: argparse.Namespace) -> int:
    from tunesmith.cli.export_cmd import run_export

    return run_export(args)


def _data(args: argparse.Namespace) -> int:
    from tunesmith.cli.data_cmd import run

    return run(args)


def _score(args: argparse.Namespace) -> int:
    from tunesmith.cli.score_cmd import run

    return run(args)


def _runs(args: argparse.Namespace) -> int:
    from tunesmith.cli.runs_cmd import run

    return run(args)


def _print_estimate(cfg: RunConfig) -> None:
    """The memory estimate as a run's first line, and a warning when free memory is below it.

    It informs and never stops a run: a model whose shape cannot be read here only loses the line."""
    from tunesmith.training.estimate import estimate_summary_line, memory_warning

    try:
        line, warning = estimate_summary_line(cfg), memory_warning(cfg)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).debug("no estimate: %s", exc)
        return
    print(line, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    from tunesmith.cli.serve_cmd import run_serve

    return run_serve(args)


def _ui(args: argparse.Namespace) -> int:
    from tunesmith.cli.serve_cmd import run_ui

    return run_ui(args)


def _synth(args: argparse.Namespace) -> int:
    from tunesmith.cli.synth_cmd import run_synth

    return run_synth(args)


def _cache(args: argparse.Namespace) -> int:
    from tunesmith.cli.cache_cmd import run

    return run(args)


def _estimate(args: argparse.Namespace) -> int:
    from tunesmith.cli.estimate_cmd import run

    return run(args)


def _eval(args: argparse.Namespace) -> int:
    from tunesmith.cli.eval_cmd import run

    return run(args)


def _schema(args: argparse.Namespace) -> int:
    from tunesmith.config.load import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
