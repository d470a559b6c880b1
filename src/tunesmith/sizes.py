"""Byte sizes as people write them ("16GB", "512 MiB", "1.5g") and as the project prints them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """`"16GB"` -> 17179869184. Units are binary (a GB is 1024**3 bytes, as memory is counted).

    Raises ValueError naming the text and the accepted forms."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r}; write a number with an optional unit, e.g. 512MB, 16GB, 1.5TB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(count: float) -> str:
    """1536 -> '1.5 KB' (binary units, one decimal above bytes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
