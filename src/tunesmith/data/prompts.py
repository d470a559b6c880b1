"""Config -> tokenized GRPO prompts, with each row's other columns kept for the reward functions.

A row holds the prompt to sample completions for, as `prompt` (a string: one user message, or
OpenAI messages) or `messages` (OpenAI messages), plus any other columns (`answer`, ...), which
reach the reward functions unchanged. The prompt must end where the model's reply starts (a user
or tool message). With method grpo every row is read this way, whatever `format: auto` would
detect: `format` may only be `auto` or `prompts`.

As for the other data: bad rows follow `data.on_error` (the first stops the run naming
`file:line`, or each is skipped and listed); prompts longer than `data.seq_len -
grpo.max_completion_length` are dropped and listed (cutting a prompt would cut the question);
`data.max_dropped_fraction` aborts a run that loses too much; then `data.dedup`, the eval split
and the shuffle (`data.seed`). Sources are concatenated: mixture weights and `samples` are
refused for now, and prompts are not cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data.build import (
    BuiltData,
    DataReport,
    SourceReport,
    check_loss_budget,
    source_template,
)
from tunesmith.data.conversation import Message, RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.formats import (
    DEFAULT_MAX_CHARS,
    RowError,
    Turn,
    check_order,
    openai_message,
    req_list,
    req_str,
    tools_field,
    type_name,
)
from tunesmith.data.limits import value_problem
from tunesmith.data.pooling import pool_and_split, refuse_mixtures

PROMPT_FORMAT = "prompts"
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")
"""Keywords the reward functions receive from the trainer; a column cannot take these names."""
_PROMPT_KEYS = ("prompt", "messages", "tools")
_PROMPT_ENDS = ("user", "tool")


@dataclass(frozen=True)
class PromptSample:
    """A validated prompt: the messages the model continues, and the row's other columns."""

    prompt: tuple[Message, ...]
    raw: Any
    """The prompt as the row gives it (a string or a list of message dicts), for the reward functions."""
    columns: dict[str, Any]
    source: RowRef
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class TokenizedPrompt:
    """The prompt's token ids (rendered with the generation prompt), plus what the rewards read."""

    prompt_ids: list[int]
    raw: Any
    columns: dict[str, Any]
    source: RowRef


@dataclass
class PromptReport(DataReport):
    """The data report, counting prompts."""

    def summary(self) -> str:
        parts = [
            f"{self.rows_read} rows read",
            f"{self.train_samples} train / {self.eval_samples} eval prompts",
            f"{self.train_tokens} prompt tokens",
            f"{len(self.skipped)} skipped",
            f"{len(self.dropped)} dropped",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates removed")
        return ", ".join(parts)


# --- one row ------------------------------------------------------------------------------------


def to_prompt(
    row: Any,
    ref: RowRef,
    required: Mapping[str, str] | None = None,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> PromptSample:
    """Convert and validate one row; raises `RowError`. `required`: column -> who reads it."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type_name(row)}, expected an object")
    problem = value_problem(row)
    if problem is not None:
        raise RowError(problem)
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt and has_messages:
        raise RowError('both "prompt" and "messages" are given; a GRPO row holds one prompt')
    if has_prompt and isinstance(row["prompt"], str):
        turns: list[Turn] = [
            ("prompt", Message("user", req_str(row, "prompt", "", max_chars, nonempty=True)))
        ]
    elif has_prompt or has_messages:
        key = "prompt" if has_prompt else "messages"
        if not isinstance(row[key], list):
            raise RowError(f"{key}: expected a string or an array of messages, got {type_name(row[key])}")
        turns = [openai_message(item, f"{key}[{i}]", max_chars) for i, item in enumerate(req_list(row, key))]
    else:
        raise RowError('missing key "prompt" (or "messages"): a GRPO row holds the prompt to sample from')
    _check_prompt(turns)
    columns = {key: value for key, value in row.items() if key not in _PROMPT_KEYS}
    _check_columns(columns, required or {})
    raw = row["prompt"] if has_prompt else row["messages"]
    return PromptSample(tuple(m for _, m in turns), raw, columns, ref, tools_field(row))


def _check_prompt(turns: list[Turn]) -> None:
    check_order(turns)
    for where, message in turns:
        if message.weight is not None:
            raise RowError(f"{where}.weight: a prompt message is never trained in GRPO (remove weight)")
    where, last = turns[-1]
    if last.role not in _PROMPT_ENDS:
        raise RowError(
            f"{where}: the prompt must end with a user or tool message (the completion is sampled after "
            f"it), got {last.role}; for a conversation that ends with its answer, move the answer to a "
            "column (e.g. answer) for the reward functions"
        )


def _check_columns(columns: dict[str, Any], required: Mapping[str, str]) -> None:
    for name in RESERVED_COLUMNS:
        if name in columns:
            raise RowError(
                f'column "{name}" has the name of an argument every reward function receives '
                f"({', '.join(RESERVED_COLUMNS)}); rename it"
            )
    for name, reader in required.items():
        if columns.get(name) is None:
            raise RowError(f'missing column "{name}" (read by {reader})')


# --- tokenizing ---------------------------------------------------------------------------------


def tokenize_prompt(
    tokenizer: Any, template: str, sample: PromptSample, reasoning: str = "keep"
) -> list[int]:
    """The ids the model is given at inference: the template's rendering with the generation prompt."""
    from tunesmith.data.tokenize import render, template_message

    messages = [template_message(m, reasoning) for m in sample.prompt]  # type: ignore[arg-type]
    text = render(tokenizer, template, messages, sample.tools, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_room(seq_len: int, max_completion_length: int) -> int:
    """The most prompt tokens that leave room for a whole completion within `data.seq_len`."""
    room = seq_len - max_completion_length
    if room < 1:
        raise DataError(
            f"data.seq_len ({seq_len}) leaves no room for a prompt before grpo.max_completion_length "
            f"({max_completion_length}) completion tokens; raise data.seq_len or lower max_completion_length"
        )
    return room


@dataclass
class _Loaded:
    prompts: list[TokenizedPrompt]
    report: SourceReport
    skipped: list[RowIssue] = field(default_factory=list)
    dropped: list[RowIssue] = field(default_factory=list)


def _rows(source: DataSource, label: str) -> Iterator[tuple[RowRef, Any]]:
    from tunesmith.data.sources import iter_file_rows, resolve_files

    if source.format not in ("auto", PROMPT_FORMAT):
        raise DataError(
            f"{label}.format: method grpo reads prompts (format: prompts, or auto), not {source.format} rows; "
            'each row needs "prompt" or "messages" ending with the user turn'
        )
    for path in resolve_files(source.path, label):
        yield from iter_file_rows(path, label)


def _load_source(
    source: DataSource,
    label: str,
    cfg: DataConfig,
    tokenizer: Any,
    room: int,
    required: Mapping[str, str],
) -> _Loaded:
    from tunesmith.data.batch_tokenize import failure_reason
    from tunesmith.data.validate import BadRowError

    template = source_template(source, label, cfg, tokenizer, "grpo") or ""
    loaded = _Loaded([], SourceReport(label, source.path))
    for ref, row in _rows(source, label):
        loaded.report.rows_read += 1
        issue = row if isinstance(row, RowIssue) else None
        if issue is None:
            try:
                sample = to_prompt(row, ref, required)
                ids = tokenize_prompt(tokenizer, template, sample, cfg.reasoning)
            except RowError as exc:
                issue = RowIssue(ref, exc.reason)
            except Exception as exc:  # noqa: BLE001 - any failure belongs to this row, reported with its line
                issue = RowIssue(ref, failure_reason(exc, SimpleNamespace(source=ref)))  # type: ignore[arg-type]
        if issue is not None:
            if cfg.on_error == "raise":
                raise BadRowError(issue)
            loaded.skipped.append(issue)
            continue
        if len(ids) > room:
            loaded.dropped.append(
                RowIssue(
                    ref,
                    f"prompt has {len(ids)} tokens, more than data.seq_len - grpo.max_completion_length = "
                    f"{room}; raise data.seq_len or shorten the prompt",
                )
            )
            continue
        loaded.prompts.append(TokenizedPrompt(ids, sample.raw, sample.columns, ref))
    loaded.report.skipped, loaded.report.dropped = len(loaded.skipped), len(loaded.dropped)
    return loaded


# --- the whole data section ---------------------------------------------------------------------


def build_prompt_data(
    cfg: DataConfig, tokenizer: Any, max_completion_length: int, required: Mapping[str, str] | None = None
) -> BuiltData:
    """Train and eval `TokenizedPrompt`s (in `BuiltData.train` / `.eval`) and a `PromptReport`.

    `required`: columns every row must have (column -> the reward function that reads it).
    """
    _check_supported(cfg)
    room = prompt_room(cfg.seq_len, max_completion_length)
    required = required or {}
    report = PromptReport()
    train_parts = [
        _load_source(s, f"data.train[{i}]", cfg, tokenizer, room, required) for i, s in enumerate(cfg.train)
    ]
    eval_parts = [
        _load_source(s, f"data.eval[{i}]", cfg, tokenizer, room, required) for i, s in enumerate(cfg.eval)
    ]
    for part in train_parts + eval_parts:
        report.rows_read += part.report.rows_read
        report.skipped.extend(part.skipped)
        report.dropped.extend(part.dropped)
    check_loss_budget(report, cfg.max_dropped_fraction)

    train, evaluation = pool_and_split(
        [(p.prompts, p.report) for p in train_parts],
        [(p.prompts, p.report) for p in eval_parts],
        cfg,
        report,
        key=_key,
        tokens=lambda prompt: len(prompt.prompt_ids),
    )
    if not train:
        raise DataError("no training prompts left after reading and tokenizing: " + report.summary())
    report.sources = [p.report for p in train_parts + eval_parts]
    report.train_samples, report.eval_samples = len(train), len(evaluation)
    report.train_tokens = sum(len(p.prompt_ids) for p in train)
    return BuiltData(train, evaluation, report)  # type: ignore[arg-type]


def _check_supported(cfg: DataConfig) -> None:
    refuse_mixtures(cfg, "GRPO prompts", "each prompt used once per epoch")


def _key(prompt: TokenizedPrompt) -> str:
    return json.dumps([prompt.prompt_ids, prompt.columns], sort_keys=True, default=str)


def prompts_fingerprint(prompts: Sequence[TokenizedPrompt]) -> str:
    """A hash of the prompts' tokens and columns in order: equal only for the same data."""
    digest = hashlib.sha256(str(len(prompts)).encode())
    for prompt in prompts:
        digest.update(_key(prompt).encode())
        digest.update(b"\n")
    return digest.hexdigest()
