"""`tunesmith cache [clear AREA...]`: what the cache holds, and clearing it.

Parsing and printing only; the work is in `tunesmith.cache_inventory`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_cache_parser(sub: Any) -> None:
    from tunesmith.cache_inventory import AREAS

    cache = sub.add_parser("cache", help="list or clear the cache (converted models, tokenized data)")
    cache.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    cache.add_argument(
        "areas",
        nargs="*",
        metavar="AREA",
        help=f"with clear: the areas to clear ({', '.join(AREAS)}; default all)",
    )
    cache.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from tunesmith.cache_inventory import AREAS, areas, clear
    from tunesmith.config.load import ConfigError
    from tunesmith.data.cache import max_bytes
    from tunesmith.sizes import format_size

    if args.action == "list" and args.areas:
        raise ConfigError("tunesmith cache: name areas only with clear, e.g. tunesmith cache clear data")
    if args.action == "clear":
        try:
            cleared = clear(args.areas or list(AREAS))
        except ValueError as exc:
            raise ConfigError(f"tunesmith cache clear: {exc}") from None
        freed = sum(a.bytes for a in cleared)
        if args.json:
            print(json.dumps({"cleared": [a.name for a in cleared], "freed_bytes": freed}))
        else:
            names = ", ".join(a.name for a in cleared) or "nothing (already empty)"
            print(f"cleared {names}: {format_size(freed)} freed")
        return 0
    listed = areas()
    if args.json:
        print(
            json.dumps(
                {
                    "areas": [
                        {"name": a.name, "path": str(a.path), "entries": a.entries, "bytes": a.bytes}
                        for a in listed
                    ],
                    "data_max_bytes": max_bytes(),
                }
            )
        )
        return 0
    width = max(len(a.name) for a in listed)
    for area in listed:
        print(f"{area.name:<{width}}  {area.entries:>5} entries  {format_size(area.bytes):>10}  {area.path}")
    print(f"total {format_size(sum(a.bytes for a in listed))}; data is capped at {format_size(max_bytes())}")
    return 0
