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


def assistant_text(row: Row, reasoning: str = "off") -> str:
    """The assistant turn: with `keep`, the reasoning as a leading `<think>` block, the way reasoning
    models write it and `data.reasoning` (keep: trained, strip: removed before rendering) reads it."""
    if reasoning == "keep" and row.reasoning:
        return f"<think>\n{row.reasoning}\n</think>\n\n{row.answer}"
    return row.answer


def to_record(row: Row, fmt: str, reasoning: str = "off") -> dict[str, Any]:
    answer = assistant_text(row, reasoning)
    if fmt == "openai":
        rec: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": row.question},
                {"role": "assistant", "content": answer},
            ]
        }
    elif fmt == "sharegpt":
        rec = {"conversations": [{"from": "human", "value": row.question}, {"from": "gpt", "value": answer}]}
    elif fmt == "alpaca":
        rec = {"instruction": row.question, "input": "", "output": answer}
    else:
        raise ValueError(f"unknown output format {fmt!r} (known: openai, sharegpt, alpaca)")
    rec["provenance"] = row.provenance
    return rec


def write_jsonl(rows: list[Row], fmt: str, out: str | Path, reasoning: str = "off") -> None:
    """Whole file or nothing: written next to `out`, then renamed over it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(to_record(row, fmt, reasoning), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
