"""`tunesmith data preview|check`: look at training data before spending compute on it.

Parsing and printing only; the work is in `tunesmith.data` (build, preview, validate, and their
preference-pair counterparts for the methods that train on pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import Any


def add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="preview or check the training data of a config")
    commands = data.add_subparsers(dest="data_command", required=True)

    preview = commands.add_parser(
        "preview", help="show tokenized samples with the trained tokens marked, and the data counts"
    )
    preview.add_argument("config", help="path to a YAML config")
    preview.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    preview.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    preview.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per sample (input_ids, labels, text; for pairs prompt_ids, "
        "chosen_ids, rejected_ids and their text)",
    )

    check = commands.add_parser("check", help="validate every row of every source; exit 1 if any is bad")
    check.add_argument("config", help="path to a YAML config")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train.0.path=x.jsonl")


def run(args: argparse.Namespace) -> int:
    return {"preview": _preview, "check": _check}[args.data_command](args)


def _preview(args: argparse.Namespace) -> int:
    from tunesmith.config.load import load_config
    from tunesmith.data.build import build_data
    from tunesmith.data.preview import sample_record, summary_lines

    cfg = load_config(args.config, args.overrides)
    tokenizer = _load_tokenizer(cfg.model, cfg.trust_remote_code)
    if _trains_on_pairs(cfg.method):
        return _preview_pairs(args, cfg, tokenizer)
    if cfg.method == "kto":
        return _preview_kto(args, cfg, tokenizer)
    if cfg.method == "grpo":
        return _preview_prompts(args, cfg, tokenizer)
    built = build_data(cfg.data, tokenizer, cfg.method)
    shown = built.train[: max(0, args.n)]
    summary = summary_lines(built, cfg.data.seq_len, cfg.data.packing)
    if args.json:
        for sample in shown:
            print(json.dumps(sample_record(tokenizer, sample), ensure_ascii=False))
        print("\n".join(summary), file=sys.stderr)
        return 0
    from tunesmith.data.preview import marked_text, rich_text, sample_header

    _print_items(
        shown, len(built.train), sample_header, partial(rich_text, tokenizer), partial(marked_text, tokenizer)
    )
    print("\n".join(summary))
    return 0


def _print_items(
    items: list[Any], total: int, header: Any, rich: Any, marked: Any, trained: str = "trained"
) -> None:
    """Each item under its header: coloured on a terminal, [[...]] marks elsewhere (pipes, files)."""
    from rich.console import Console

    console = Console(highlight=False)
    for index, item in enumerate(items):
        title = header(item, index, total)
        if console.is_terminal:
            console.rule(title, align="left")
            console.print(rich(item), soft_wrap=True)
        else:
            print(f"--- {title} ---")
            print(marked(item))
    if items:
        legend = f"{trained} tokens in green" if console.is_terminal else f"{trained} tokens in [[...]]"
        print(f"({legend})\n")


def _preview_pairs(args: argparse.Namespace, cfg: Any, tokenizer: Any) -> int:
    from tunesmith.data.preference import build_preference_data
    from tunesmith.data.preference_preview import pair_record, pair_summary_lines

    built = build_preference_data(cfg.data, tokenizer, cfg.method)
    shown = built.train[: max(0, args.n)]
    summary = pair_summary_lines(built)
    if args.json:
        for pair in shown:
            print(json.dumps(pair_record(tokenizer, pair), ensure_ascii=False))
        print("\n".join(summary), file=sys.stderr)
        return 0
    from tunesmith.data.preference_preview import marked_pair, pair_header, rich_pair

    _print_items(
        shown,
        len(built.train),
        pair_header,
        partial(rich_pair, tokenizer),
        partial(marked_pair, tokenizer),
        "scored",
    )
    print("\n".join(summary))
    return 0


def _preview_kto(args: argparse.Namespace, cfg: Any, tokenizer: Any) -> int:
    from tunesmith.data.kto import build_kto_data, kto_record, kto_summary_lines

    weights = (cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    built = build_kto_data(cfg.data, tokenizer, weights)
    shown = built.train[: max(0, args.n)]
    summary = kto_summary_lines(built)
    if args.json:
        for example in shown:
            print(json.dumps(kto_record(tokenizer, example), ensure_ascii=False))
        print("\n".join(summary), file=sys.stderr)
        return 0
    from tunesmith.data.kto import kto_header, marked_kto, rich_kto

    _print_items(
        shown, len(built.train), kto_header, partial(rich_kto, tokenizer), partial(marked_kto, tokenizer)
    )
    print("\n".join(summary))
    return 0


def _grpo_prompts(cfg: Any, tokenizer: Any, on_error: str) -> Any:
    from tunesmith.data.prompts import build_prompt_data
    from tunesmith.training.rewards import load_rewards, required_columns

    data = cfg.data.model_copy(update={"on_error": on_error, "max_dropped_fraction": 1.0})
    needed = required_columns(load_rewards(cfg.grpo.rewards))
    return build_prompt_data(data, tokenizer, cfg.grpo.max_completion_length, needed)


def _preview_prompts(args: argparse.Namespace, cfg: Any, tokenizer: Any) -> int:
    """GRPO's prompts as the model sees them (generation prompt included) and the columns rewards read."""
    built = _grpo_prompts(cfg, tokenizer, cfg.data.on_error)
    shown = built.train[: max(0, args.n)]
    for index, prompt in enumerate(shown):
        record = {
            "source": str(prompt.source),
            "prompt_tokens": len(prompt.prompt_ids),
            "rendered": tokenizer.decode(prompt.prompt_ids),
            "columns": prompt.columns,
        }
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(
                f"--- prompt {index + 1}/{len(built.train)}: {record['source']}, {record['prompt_tokens']} tokens ---"
            )
            print(record["rendered"])
            if prompt.columns:
                print(f"columns: {json.dumps(prompt.columns, ensure_ascii=False)}")
    print(built.report.summary(), file=sys.stderr if args.json else sys.stdout)
    return 0


def _check_prompts(cfg: Any) -> int:
    """GRPO prompts: every bad or too-long row as `file:line: reason` (needs the tokenizer: lengths)."""
    from tunesmith.data.errors import DataError

    tokenizer = _load_tokenizer(cfg.model, cfg.trust_remote_code)
    try:
        built = _grpo_prompts(cfg, tokenizer, "skip")
    except DataError as exc:
        print(exc)
        return 1
    report = built.report
    issues = sorted(report.skipped + report.dropped, key=lambda i: (i.ref.file, i.ref.line))
    for issue in issues:
        print(issue)
    verdict = "all valid" if not issues else f"{len(issues)} problem{'s' if len(issues) != 1 else ''}"
    print(f"checked {report.rows_read} rows of {len(cfg.data.train) + len(cfg.data.eval)} sources: {verdict}")
    return 1 if issues else 0


def _trains_on_pairs(method: str) -> bool:
    from tunesmith.data.preference_formats import PREFERENCE_METHODS

    return method in PREFERENCE_METHODS


def _check(args: argparse.Namespace) -> int:
    """Every bad row of every source as `file:line: reason`, then a summary; 1 if anything is bad.

    Each source is read with `read_samples(on_error="skip")`, which is what `check_files` does per
    path, so that each source keeps its own format and its own `data.train[i]` label. A preference
    method reads pairs; a pair kept but worth a look (chosen identical to rejected) is a note, not a
    problem.
    """
    from tunesmith.config.load import load_config
    from tunesmith.data.errors import DataError
    from tunesmith.data.kto import read_kto_samples
    from tunesmith.data.sources import resolve_files
    from tunesmith.data.validate import read_samples

    cfg = load_config(args.config, args.overrides)
    if cfg.method == "grpo":
        return _check_prompts(cfg)
    sources = [(f"data.train[{i}]", s) for i, s in enumerate(cfg.data.train)]
    sources += [(f"data.eval[{i}]", s) for i, s in enumerate(cfg.data.eval)]
    pairs = _trains_on_pairs(cfg.method)
    bad = rows = files = notes = 0
    for label, source in sources:
        try:
            if cfg.method == "kto":
                result = read_kto_samples(source.path, source.format, "skip", label)
            else:
                result = read_samples(source.path, source.format, "skip", label, pairs=pairs)
        except DataError as exc:  # the path itself: missing, unsupported, undetectable format
            print(exc)
            bad += 1
            continue
        for issue in sorted(result.issues + result.notes, key=lambda i: (i.ref.file, i.ref.line)):
            print(f"{issue.ref}: note: {issue.reason}" if issue in result.notes else issue)
        bad += len(result.issues)
        notes += len(result.notes)
        rows += result.rows_read
        files += len(resolve_files(source.path, label))
    verdict = "all valid" if not bad else f"{bad} problem{'s' if bad != 1 else ''}"
    if notes:
        verdict += f", {notes} note{'s' if notes != 1 else ''}"
    print(
        f"checked {rows} rows in {files} file{'s' if files != 1 else ''} of {len(sources)} sources: {verdict}"
    )
    return 1 if bad else 0


def _load_tokenizer(spec: str, trust_remote_code: bool) -> Any:
    """Only the tokenizer: `model: default` must not convert the whole model to preview data."""
    from tunesmith.models.load import load_tokenizer, resolve_model_dir

    if spec == "default":
        from tunesmith.models.default_model import default_tokenizer_dir

        return load_tokenizer(default_tokenizer_dir())
    return load_tokenizer(resolve_model_dir(spec), trust_remote_code)
