"""`tunesmith runs [DIR]` and `tunesmith runs compare RUN RUN ...`: parsing and printing only.

The work is in `tunesmith.runs`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_PLOT = "runs-compare.png"


def add_runs_parser(sub: Any) -> None:
    runs = sub.add_parser(
        "runs",
        help="list the runs under a folder, or compare runs",
        description="tunesmith runs [DIR]: a table of the runs under DIR (default: runs). "
        "tunesmith runs compare RUN RUN ...: their loss curves in one PNG and the config keys that differ.",
    )
    runs.add_argument(
        "paths", nargs="*", metavar="DIR", help="a folder of runs (default: runs), or: compare RUN RUN ..."
    )
    runs.add_argument("--json", action="store_true", help="print machine-readable JSON")
    runs.add_argument(
        "--depth", type=int, default=None, help="folder levels below DIR searched for runs (default 3)"
    )
    runs.add_argument("--out", help=f"compare: where to write the plot (default: {DEFAULT_PLOT})")


def run(args: argparse.Namespace) -> int:
    if args.paths and args.paths[0] == "compare" and not _is_runs_folder(args.paths):
        return _compare(args, [Path(p) for p in args.paths[1:]])
    return _overview(args)


def _is_runs_folder(paths: list[str]) -> bool:
    """`tunesmith runs compare` alone, with a folder named `compare`: that folder's overview."""
    return len(paths) == 1 and Path(paths[0]).is_dir()


def _overview(args: argparse.Namespace) -> int:
    from tunesmith.config.load import ConfigError
    from tunesmith.runs.overview import SEARCH_DEPTH, format_table, overview

    if len(args.paths) > 1:
        raise ConfigError(
            "tunesmith runs: give one folder (tunesmith runs DIR), or compare runs with "
            "`tunesmith runs compare RUN RUN ...`"
        )
    root = Path(args.paths[0] if args.paths else "runs")
    if not root.is_dir():
        raise ConfigError(f"tunesmith runs: {root} is not a directory; give the folder that holds your runs")
    summaries = overview(root, SEARCH_DEPTH if args.depth is None else args.depth)
    if args.json:
        print(json.dumps([s.as_dict() for s in summaries], indent=1))
        return 0
    if not summaries:
        print(f"no runs under {root}")
        return 0
    print(format_table(summaries, root))
    return 0


def _compare(args: argparse.Namespace, paths: list[Path]) -> int:
    from tunesmith.runs.compare import compare_runs, format_comparison

    result = compare_runs(paths, Path(args.out or DEFAULT_PLOT))
    if args.json:
        print(json.dumps(result.as_dict(), indent=1, default=str))
    else:
        print(format_comparison(result))
    return 0
