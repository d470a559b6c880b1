"""`tunesmith eval MODEL_OR_RUN_DIR --task KIND:PATH ... [--compare OTHER] [--out results.json]`.

Parsing and printing only; the work is in `tunesmith.eval`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

TASK_OPTIONS = (
    "shots",
    "dev_path",
    "limit",
    "chat_template",
    "all_tokens",
    "match",
    "pattern",
    "function",
    "max_new_tokens",
)
"""Flags that set the same field of every --task."""


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="evaluate a model or a finished run: perplexity, multiple choice and generation tasks",
    )
    ev.add_argument(
        "model", help="a run directory, an adapter or model directory, a .gguf file, or 'default'"
    )
    ev.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="KIND:PATH",
        help="a task: perplexity:FILE (any training data format), mc:FILE (multiple choice) or gen:FILE "
        "(generation); repeat for several",
    )
    ev.add_argument("--shots", type=int, help="mc: examples from the dev split before each question")
    ev.add_argument(
        "--dev",
        dest="dev_path",
        metavar="PATH",
        help="mc: the file the shots come from (default: the task file's rows with split: dev)",
    )
    ev.add_argument("--limit", type=int, help="score only the first N items of each task")
    ev.add_argument(
        "--chat-template", action="store_true", default=None, help="mc: prompt through the chat template"
    )
    ev.add_argument(
        "--all-tokens",
        action="store_true",
        default=None,
        help="perplexity: score every token, not only replies",
    )
    ev.add_argument(
        "--match", choices=("exact", "regex", "contains", "callable"), help="gen: how answers are compared"
    )
    ev.add_argument(
        "--pattern", help="gen, --match regex: the answer is the last match (default: the last number)"
    )
    ev.add_argument("--function", help="gen, --match callable: module:function or path/file.py:function")
    ev.add_argument("--max-new-tokens", type=int, help="gen: tokens generated per item (default 256)")
    ev.add_argument(
        "--compare", metavar="OTHER", help="also evaluate OTHER and show OTHER - MODEL with a 95%% CI"
    )
    ev.add_argument("--out", help="write the results here as JSON (results.json)")
    ev.add_argument("--log-samples", action="store_true", help="keep every item's prompt, output and score")
    ev.add_argument(
        "--harness", metavar="TASKS", help="also run these lm-evaluation-harness tasks (comma-separated)"
    )
    ev.add_argument("--harness-include", metavar="DIR", help="a folder of lm-eval task YAMLs (local tasks)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap (default 0)")


def build_tasks(args: argparse.Namespace) -> list[Any]:
    """The EvalTasks the flags describe; a bad one is a ConfigError naming the flag."""
    from pydantic import ValidationError

    from tunesmith.config.load import ConfigError
    from tunesmith.config.schema import EvalTask

    given = {name: getattr(args, name) for name in TASK_OPTIONS if getattr(args, name, None) is not None}
    tasks = []
    for spec in args.task:
        try:
            task = EvalTask.model_validate(spec)
            tasks.append(EvalTask.model_validate({**task.model_dump(), **given}))
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"--task {spec}: {reasons}") from None
    return tasks


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.load import ConfigError
    from tunesmith.eval.results import results_payload, write_results

    tasks = build_tasks(args)
    if not tasks and not args.harness:
        raise ConfigError("tunesmith eval: give at least one --task KIND:PATH (or --harness TASKS)")
    if args.harness_include and not args.harness:
        raise ConfigError("--harness-include names lm-eval task YAMLs; use it with --harness TASKS")
    results = _evaluate(args.model, tasks, args)
    other = differences = None
    if args.compare:
        from tunesmith.eval.compare import compare_results

        other = (args.compare, _evaluate(args.compare, tasks, args))
        differences = compare_results(results, other[1], seed=args.seed)
    print_table(args.model, results, other, differences)
    if args.out:
        payload = results_payload(results, model=args.model, other=other, differences=differences)
        print(f"results written to {write_results(args.out, payload)}")
    return 0


def _evaluate(spec: str, tasks: list[Any], args: argparse.Namespace) -> list[Any]:
    from tunesmith.eval.tasks import evaluate_model

    results = evaluate_model(spec, tasks, log_samples=args.log_samples) if tasks else []
    if args.harness:
        results += _harness(spec, args)
    return results


def _harness(spec: str, args: argparse.Namespace) -> list[Any]:
    from tunesmith.config.load import ConfigError

    try:
        from tunesmith.eval.harness import run_harness
    except ImportError as exc:
        raise ConfigError(
            f"--harness needs lm-evaluation-harness: pip install 'tunesmith[eval]' ({exc})"
        ) from None
    names = [name.strip() for name in args.harness.split(",") if name.strip()]
    if not names:
        raise ConfigError("--harness: name at least one lm-eval task, e.g. --harness mmlu,arc_easy")
    return run_harness(
        spec,
        names,
        limit=args.limit,
        shots=args.shots,
        log_samples=args.log_samples,
        include_path=args.harness_include,
    )


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def table_rows(
    results: list[Any], other: tuple[str, list[Any]] | None, differences: list[dict[str, Any]] | None
) -> list[list[str]]:
    """One row per task and metric: task, n, value (and with a comparison: other, diff, 95% CI)."""
    by_task = {d["task"]: {x["metric"]: x for x in d["differences"]} for d in differences or []}
    theirs = {r.task: r for r in other[1]} if other else {}
    rows = []
    for result in results:
        for k, (metric, value) in enumerate(result.metrics.items()):
            row = [result.task if k == 0 else "", str(result.n) if k == 0 else "", metric, _fmt(value)]
            if other is not None:
                diff = by_task.get(result.task, {}).get(metric)
                b = theirs.get(result.task)
                row.append(_fmt(b.metrics.get(metric)) if b else "")
                row.append(_fmt(diff["diff"], sign=True) if diff else "")
                ci = diff and diff["low"] is not None
                row.append(f"[{_fmt(diff['low'], True)}, {_fmt(diff['high'], True)}]" if ci else "")
            rows.append(row)
    return rows


def print_table(
    model: str,
    results: list[Any],
    other: tuple[str, list[Any]] | None = None,
    differences: list[dict[str, Any]] | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for name in ("task", "n", "metric", model):
        table.add_column(name, justify="right" if name in ("n", model) else "left", overflow="fold")
    if other is not None:
        table.add_column(other[0], justify="right", overflow="fold")
        table.add_column("diff", justify="right")
        table.add_column("95% CI", justify="right")
    for row in table_rows(results, other, differences):
        table.add_row(*row)
    Console(highlight=False).print(table)
    if other is not None:
        print(f"diff = {other[0]} - {model}; 95% CI from a paired bootstrap over items")
