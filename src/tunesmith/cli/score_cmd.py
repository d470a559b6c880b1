"""`tunesmith score RUN_DIR`: rewards from a finished reward run, for one response or a JSONL file.

Parsing and printing only; the work is in `tunesmith.scoring`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_score_parser(sub: Any) -> None:
    score = sub.add_parser("score", help="score responses with a finished reward model run (method: reward)")
    score.add_argument("run_dir", help="a finished run trained with method: reward")
    score.add_argument("--prompt", help="the prompt (one user message); use with --response")
    score.add_argument("--response", help="the response to score (one assistant message)")
    score.add_argument(
        "--file",
        help="a JSONL file: rows of prompt + response (adds `score`) or preference pairs "
        "(adds `chosen_score` and `rejected_score`)",
    )
    score.add_argument("--out", help="write the scored rows here (JSONL) instead of to stdout")
    score.add_argument("--batch-size", type=int, default=16, help="responses per packed forward (default 16)")


def run(args: argparse.Namespace) -> int:
    from tunesmith.config.load import ConfigError
    from tunesmith.scoring import load_reward_model, score_file
    from tunesmith.training.run_dir import read_run_info

    single = args.prompt is not None or args.response is not None
    if single == (args.file is not None) or (single and (args.prompt is None or args.response is None)):
        raise ConfigError("tunesmith score: give --prompt and --response, or --file rows.jsonl")
    if args.batch_size < 1:
        raise ConfigError(f"tunesmith score: --batch-size must be at least 1, got {args.batch_size}")
    read_run_info(Path(args.run_dir))  # names a missing or unfinished run before anything loads
    loaded = load_reward_model(args.run_dir)
    if single:
        print(f"{loaded.score(args.prompt, args.response):.6f}")
        return 0
    rows = score_file(loaded, Path(args.file), args.batch_size)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    pairs = [row for row in rows if "chosen_score" in row]
    if pairs:
        correct = sum(row["chosen_score"] > row["rejected_score"] for row in pairs)
        print(f"{len(pairs)} pairs: accuracy {correct / len(pairs):.4f}", file=sys.stderr)
    return 0
