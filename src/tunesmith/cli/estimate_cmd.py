"""`tunesmith estimate CONFIG [k=v ...] [--budget 16GB] [--json]`: memory and time before a run.

Parsing and printing only; the work is in `tunesmith.training.estimate`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_estimate_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "estimate",
        help="predict a run's peak memory and time per step from its config (no weights loaded)",
    )
    parser.add_argument("config", help="path to a YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=8")
    parser.add_argument(
        "--budget",
        help="a memory budget (e.g. 16GB): the largest batch and seq_len that fit, and which setups do",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (peak_bytes and the parts)"
    )
    parser.add_argument(
        "--no-calibrate", action="store_true", help="skip the one-layer timing run (memory only)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="estimate for this device; default: the one the run would use",
    )


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.load import ConfigError, load_config
    from tunesmith.sizes import format_size, parse_size
    from tunesmith.training.estimate import EstimateError, estimate, shape_of, signed_size, what_fits

    cfg = load_config(args.config, list(args.overrides))
    try:
        budget = parse_size(args.budget) if args.budget else None
    except ValueError as exc:
        raise ConfigError(f"--budget: {exc}") from None
    try:
        result = estimate(cfg, calibrate=not args.no_calibrate, device=args.device)
    except EstimateError as exc:
        raise ConfigError(str(exc)) from None
    answer = None
    if budget is not None:
        shape = shape_of(cfg.model, cfg.trust_remote_code)
        answer = what_fits(shape, result.plan, budget)
    if args.json:
        payload = result.to_json()
        if answer is not None:
            payload["budget"] = answer.to_json()
        print(json.dumps(payload))
        return 0
    print(result.summary_line())
    width = max(len(k) for k in result.parts)
    for part, size in result.parts.items():
        print(f"  {part:<{width}}  {signed_size(size):>10}")
    print(f"  {'peak':<{width}}  {format_size(result.peak_bytes):>10}")
    print(f"  trainable parameters: {result.trainable_params:,} of {result.total_params:,}")
    if result.calibration:
        c = result.calibration
        print(
            f"  time: one layer fwd+bwd {c['layer_seconds']:.3f} s on {c['tokens_timed']} tokens "
            f"({c['gflops']} GFLOP/s) -> about {result.step_seconds:.1f} s per optimizer step"
        )
    if answer is not None:
        verdict = "fits" if answer.fits else "does not fit"
        print(
            f"budget {format_size(answer.budget)}: this config {verdict} ({format_size(answer.peak_bytes)})"
        )
        print(
            f"  largest batch_size at seq_len {result.plan.seq_len}: {answer.max_batch_size or 'none fits'}; "
            f"largest seq_len at batch_size {result.plan.batch_size}: {answer.max_seq_len or 'none fits'}"
        )
        for choice in answer.choices:
            mark = "fits" if choice["fits"] else "too big"
            print(
                f"  {choice['adapter']:<11} {choice['optimizer']:<11} {format_size(choice['peak_bytes']):>10}  {mark}"
            )
    return 0
