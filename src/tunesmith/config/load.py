"""YAML + dotted CLI overrides -> a validated RunConfig, with errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunesmith.config.schema import METHOD_SECTIONS, RunConfig


class ConfigError(ValueError):
    """A configuration problem; the message names each bad key, its value and what is allowed."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); the value is parsed as YAML (lists and dicts too)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.problem})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict, creating sections as needed; list items by index (`data.train.0.path`)."""
    raw = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    items = [(key.split(".") if isinstance(key, str) else key, value) for key, value in raw]
    _drop_switched_sections(data, items)
    for parts, value in items:
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, where)]
                continue
            if not isinstance(node.get(part), dict | list):
                if part in node and node[part] is not None and not isinstance(node[part], str):
                    raise ConfigError(f"override {'.'.join(parts)}: {where} is not a section")
                node[part] = {"type": node[part]} if isinstance(node.get(part), str) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(parts))] = value
        else:
            node[last] = value
    return data


def _drop_switched_sections(data: dict[str, Any], items: list[tuple[list[str], Any]]) -> None:
    """`adapter.type=full` on a LoRA section starts that section afresh: the old type's keys (r,
    dropout, ...) were never typed by the user, so they must not turn into errors about them. Keys set
    in the same override list are applied afterwards and still validated."""
    for parts, value in items:
        if len(parts) < 2 or parts[-1] != "type":
            continue
        section = _find_section(data, parts[:-1])
        if isinstance(section, dict) and _section_type(section, parts[:-1]) not in (None, value):
            section.clear()


def _find_section(data: dict[str, Any], parts: list[str]) -> Any:
    """The existing node at `parts`, or None where the path does not exist yet."""
    node: Any = data
    for part in parts:
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def _section_type(section: dict[str, Any], parts: list[str]) -> Any:
    """The section's type as written, else the type the schema gives a section without one."""
    if "type" in section:
        return section["type"]
    field = RunConfig.model_fields.get(parts[0]) if len(parts) == 1 else None
    default = field.get_default(call_default_factory=True) if field is not None else None
    return getattr(default, "type", None)


def _list_index(node: list[Any], part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {where}: index {part!r} is out of range (list has {len(node)} items)")
    return int(part)


def load_config(
    source: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | dict[str, Any] | None = None
) -> RunConfig:
    """Build the frozen RunConfig from a YAML path or a dict, then apply overrides."""
    if isinstance(source, RunConfig):
        data = source.model_dump(mode="python")
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))  # deep copy, plain types only
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `train.lr: expected a positive number, got "fast"`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        lines.append(f"{loc or 'config'}: {_describe(err)}")
    return "invalid config:\n  " + "\n  ".join(dict.fromkeys(lines))


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in {"lora", "full", "freeze"}


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    shown = json.dumps(got) if isinstance(got, str | int | float | bool | type(None)) else type(got).__name__
    if kind in {"float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"}:
        what = "an integer" if kind.startswith("int") else "a number"
        if _is_positive_field(err["loc"]):
            what = "a positive integer" if kind.startswith("int") else "a positive number"
        return f"expected {what}, got {shown}"
    if kind == "greater_than" and ctx.get("gt") == 0:
        return f"expected a positive number, got {shown}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        bound = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        limit = next(iter(ctx.values()))
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"expected a number {bound} {limit}, got {shown}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {shown}"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; `tunesmith config-schema` lists every key)"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"expected type one of {ctx.get('expected_tags')}, got {json.dumps(ctx.get('tag'))}"
    if kind == "union_tag_not_found":
        return "needs a 'type' key (lora, full or freeze)"
    if kind == "bool_parsing" or kind == "bool_type":
        return f"expected true or false, got {shown}"
    if kind == "too_short":
        return "needs at least one entry"
    if kind in {"string_type", "list_type", "dict_type", "model_type", "model_attributes_type"}:
        expected = {"string_type": "a string", "list_type": "a list", "dict_type": "a mapping"}.get(
            kind, "a mapping"
        )
        return f"expected {expected}, got {shown}"
    if kind == "value_error":  # our own validators: the message already says what is wrong
        message = str(err["msg"]).removeprefix("Value error, ")
        return message if shown in {"dict", "list"} else f"{message}, got {shown}"
    return f"{err['msg']}, got {shown}"


def _is_positive_field(loc: tuple[Any, ...]) -> bool:
    """Whether the field at `loc` carries a `> 0` constraint, to say 'positive' in its error."""
    model: Any = RunConfig
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        info = fields[part]
        model = info.annotation
    return info is not None and any(getattr(m, "gt", None) == 0 for m in info.metadata)


def config_schema() -> dict[str, Any]:
    return RunConfig.model_json_schema()


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML that loads back: only the chosen method's settings section."""
    others = {name for name in METHOD_SECTIONS if name != cfg.method}
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=others), sort_keys=False)
