"""Bounds on what one parsed row may contain, checked before anything walks it recursively.

A row nested thousands of levels deep makes every recursive consumer (the JSON parser, Jinja's
`tojson`, pickle, deep comparisons) raise RecursionError, which would take the whole build down
instead of one row. A lone UTF-16 surrogate (a JSON `"\\ud800"` escape without its pair) is a
`str` Python accepts but no tokenizer can encode. Both are found here, without recursion, so the
row is reported at its line like any other bad row.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 100
"""Most levels of nested arrays and objects in one row (the row object itself is level 1)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
Path = tuple[Any, ...]  # (parent path, key) pairs, rendered only when a problem is found


class TooDeep(ValueError):
    """A JSON text whose nesting is beyond what can be parsed or used safely."""


def too_deep_reason(where: str = "") -> str:
    """The reason shown for a row nested beyond `MAX_DEPTH` (the first words are stable)."""
    under = f" (in {where})" if where else ""
    return f"nested too deeply: more than {MAX_DEPTH} levels of arrays and objects{under}"


def loads_bounded(text: str | bytes) -> Any:
    """`json.loads` that raises `TooDeep` instead of RecursionError for absurdly nested input."""
    try:
        return json.loads(text)
    except RecursionError:
        raise TooDeep(too_deep_reason()) from None


def value_problem(value: Any, where: str = "") -> str | None:
    """Why a parsed value cannot be used (too deep, or a lone surrogate in a string), else None.

    Iterative, so a value of any depth is judged without recursion; `where` names the value.
    """
    stack: list[tuple[Any, int, Path]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            reason = _surrogate_reason(item, path, where)
            if reason:
                return reason
            continue
        if isinstance(item, dict):
            children = list(item.items())
        elif isinstance(item, list | tuple):
            children = list(enumerate(item))
        else:
            continue
        if depth > MAX_DEPTH:
            return too_deep_reason(where or _render(_root_step(path), ""))
        for key, child in reversed(children):
            if isinstance(key, str) and _SURROGATE.search(key):
                return _surrogate_reason(key, path, where, is_key=True)
            stack.append((child, depth + 1, (path, key)))
    return None


def surrogate_reason(text: str, where: str) -> str | None:
    """The reason a string field holds a lone surrogate, or None when it is valid text."""
    return _surrogate_reason(text, (), where)


def _surrogate_reason(text: str, path: Path, where: str, *, is_key: bool = False) -> str | None:
    found = _SURROGATE.search(text)
    if found is None:
        return None
    code = f"\\u{ord(found.group()):04x}"
    place = _render(path, where) or "row"
    what = "a key" if is_key else "the string"
    return (
        f"{place}: lone surrogate {code} at character {found.start() + 1} of {what} "
        f"(an unpaired \\uD800-\\uDFFF escape is not valid Unicode text)"
    )


def _root_step(path: Path) -> Path:
    """Only the first key of a path: a 100-level path would be unreadable."""
    first: Path = ()
    while path:
        first, path = path, path[0]
    return ((), first[1]) if first else ()


def _render(path: Path, where: str) -> str:
    """`messages[2].content` from the (parent, key) chain."""
    keys: list[Any] = []
    while path:
        path, key = path
        keys.append(key)
    out = where
    for key in reversed(keys):
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out = f"{out}.{key}" if out else str(key)
    return out
