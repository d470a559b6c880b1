"""Kept rows as JSONL in the chosen format, which `tunesmith data` reads as it is.

Provenance goes in a side field `provenance`: the data readers look only at the keys of the
format (`messages`, `conversations`, `instruction`/`output`), so an extra top-level key is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunesmith.synth.filters import Row


def to_record(row: Row, fmt: str) -> dict[str, Any]:
    if fmt == "openai":
        rec: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": row.question},
                {"role": "assistant", "content": row.answer},
            ]
        }
    elif fmt == "sharegpt":
        rec = {
            "conversations": [{"from": "human", "value": row.question}, {"from": "gpt", "value": row.answer}]
        }
    elif fmt == "alpaca":
        rec = {"instruction": row.question, "input": "", "output": row.answer}
    else:
        raise ValueError(f"unknown output format {fmt!r} (known: openai, sharegpt, alpaca)")
    rec["provenance"] = row.provenance
    return rec


def write_jsonl(rows: list[Row], fmt: str, out: str | Path) -> None:
    """Whole file or nothing: written next to `out`, then renamed over it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(to_record(row, fmt), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
