"""GRPO's reward functions: the built-ins, user callables named `package.module:name`, and their sum.

A reward function scores each completion of a batch (TRL's convention):

    fn(prompts, completions, **columns) -> list[float]

`prompts` are the prompts as the data rows give them (a string, or a list of message dicts),
repeated once per completion; `completions` the decoded completion texts (special tokens
removed); keyword arguments are `completion_ids` (the completion's token ids, the stop token
excluded), every other column of the rows (one list per column, aligned with `completions`) and
the entry's `args`. A function that takes no `**kwargs` receives only the keywords it names. It
returns one number per completion; None (or NaN) means "does not apply" and is left out of that
function's statistics, as in TRL. The total reward is the weighted sum over functions, where a
function that does not apply counts 0.

A callable is named by an importable module and an attribute, never by a file path: nothing is
executed from a path a config gives, only modules Python can already import (installed, or on
PYTHONPATH). Every error names the config entry (`grpo.rewards[1]`) and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.schema import RewardFunction

RESERVED_KEYWORDS = ("prompts", "completions", "completion_ids")
"""Names every reward function may receive; a data column or an arg cannot take them."""

_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class RewardError(ValueError):
    """A reward function that cannot be loaded or that returned something unusable."""


@dataclass(frozen=True)
class Reward:
    """One `grpo.rewards` entry, ready to call."""

    name: str
    """The metric name: the built-in's name or the callable's `module:name` (with `#i` if repeated)."""
    where: str
    """The config key, e.g. grpo.rewards[0], for error messages."""
    weight: float
    fn: Callable[..., Any]
    args: dict[str, Any]
    columns: tuple[str, ...] = ()
    """Data columns every row must have for this function (e.g. exact_match's `column`)."""
    keywords: frozenset[str] | None = None
    """The keywords `fn` accepts; None: any (it takes **kwargs)."""

    def __call__(
        self,
        prompts: list[Any],
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict[str, list],
    ) -> list[float]:
        offered = {"completion_ids": completion_ids, **columns, **self.args}
        if self.keywords is not None:
            offered = {k: v for k, v in offered.items() if k in self.keywords}
        try:
            values = self.fn(prompts=prompts, completions=completions, **offered)
        except Exception as exc:  # a user's function: its failure is reported with the entry it came from
            raise RewardError(f"{self.where} ({self.name}) raised {type(exc).__name__}: {exc}") from exc
        return _check_values(values, len(completions), f"{self.where} ({self.name})")


def _check_values(values: Any, expected: int, label: str) -> list[float]:
    """One finite float (or NaN for None) per completion, or an error saying what came back."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    elif hasattr(values, "tolist") and not isinstance(values, list | tuple):  # numpy arrays
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise RewardError(
            f"{label} returned {type(values).__name__}; a reward function returns a list with one float "
            f"per completion ({expected} here)"
        )
    if len(values) != expected:
        raise RewardError(
            f"{label} returned {len(values)} values for {expected} completions; it must return one float "
            "per completion, in order"
        )
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if not isinstance(value, bool | int | float):
            raise RewardError(
                f"{label} returned {type(value).__name__} {value!r} at position {i}; rewards are numbers "
                "(or None where the function does not apply)"
            )
        value = float(value)
        if math.isinf(value):
            raise RewardError(f"{label} returned {value} at position {i}; rewards must be finite")
        out.append(value)
    return out


# ------------------------------------------------------------------------------------ built-ins


def _arg(
    args: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...
) -> Any:
    if key not in args:
        if default is ...:
            raise RewardError(f"{where}.args.{key}: required")
        return default
    value = args[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RewardError(f"{where}.args.{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def _only_args(args: dict[str, Any], allowed: Sequence[str], where: str, name: str) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise RewardError(
            f"{where}.args: unknown argument(s) {', '.join(unknown)} for {name} (it takes: {', '.join(allowed)})"
        )


def regex_reward(pattern: str, fullmatch: bool = False) -> Callable[..., list[float]]:
    """1.0 where the completion matches `pattern`, else 0.0.

    By default the pattern is *searched* anywhere in the completion (anchor it with ^ and $, or
    set `fullmatch: true`, to demand the whole completion; fullmatch compares the completion with
    surrounding whitespace stripped).
    """
    compiled = re.compile(pattern)
    test = (lambda text: compiled.fullmatch(text.strip())) if fullmatch else compiled.search

    def regex(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
        return [1.0 if test(text) else 0.0 for text in completions]

    return regex


_BOXED = re.compile(r"\\boxed\{")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_STRIP_CHARS = " \t\n\r.,;:!?\"'`*$"


def final_answer(text: str) -> str:
    """The answer a completion ends on: the last \\boxed{...}, else what follows the last '####'
    (GSM8K style), else what follows the last 'answer:' (any case), else the last non-empty line."""
    boxed = list(_BOXED.finditer(text))
    if boxed:
        start = boxed[-1].end()
        depth, end = 1, start
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        return text[start : end - 1] if depth == 0 else text[start:]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    lowered = text.lower()
    if "answer:" in lowered:
        return text[lowered.rindex("answer:") + len("answer:") :]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation, quotes and $ removed; numbers
    without thousands separators and in canonical form ("4.0" -> "4", "1,000" -> "1000")."""
    text = " ".join(str(text).split()).strip(_STRIP_CHARS).casefold()
    number = text.replace(",", "")
    if _NUMBER.match(number):
        value = float(number)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return text


_NUMBERS = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def answers_match(completion: str, answer: Any) -> bool:
    """Whether the completion's final answer is `answer`, both normalised; for a numeric `answer`
    the last number of the final answer counts ("The sum is 12." matches 12, "12 or 13" does not)."""
    expected = normalize_answer(str(answer))
    given = final_answer(completion)
    if normalize_answer(given) == expected:
        return True
    numbers = _NUMBERS.findall(given)
    return bool(_NUMBER.match(expected)) and bool(numbers) and normalize_answer(numbers[-1]) == expected


def exact_match_reward(column: str = "answer") -> Callable[..., list[float]]:
    """1.0 where the completion's final answer equals the row's `column` (see `answers_match`), else 0.0."""

    def exact_match(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
        answers = columns[column]
        return [
            1.0 if answers_match(text, answer) else 0.0
            for text, answer in zip(completions, answers, strict=True)
        ]

    return exact_match


def length_penalty_reward(
    max_chars: int | None = None, max_tokens: int | None = None
) -> Callable[..., list[float]]:
    """0 up to the limit, then minus the excess as a fraction of the limit: -(length - limit) / limit.

    Length in characters of the completion text (`max_chars`) or in its tokens (`max_tokens`, the
    stop token not counted).
    """
    limit = max_chars if max_chars is not None else max_tokens
    assert limit is not None

    def length_penalty(prompts: list[Any], completions: list[str], **kw: Any) -> list[float]:
        lengths = (
            [len(t) for t in completions] if max_chars is not None else [len(i) for i in kw["completion_ids"]]
        )
        return [-max(0, n - limit) / limit for n in lengths]

    return length_penalty


def _builtin(name: str, args: dict[str, Any], where: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The built-in's scoring function (arguments checked now) and the columns it reads."""
    if name == "regex":
        _only_args(args, ("pattern", "fullmatch"), where, name)
        pattern = _arg(args, "pattern", str, where)
        try:
            fn = regex_reward(pattern, _arg(args, "fullmatch", bool, where, False))
        except re.error as exc:
            raise RewardError(
                f"{where}.args.pattern: invalid regular expression {pattern!r}: {exc}"
            ) from None
        return fn, ()
    if name == "exact_match":
        _only_args(args, ("column",), where, name)
        column = _arg(args, "column", str, where, "answer")
        if column in RESERVED_KEYWORDS:
            raise RewardError(f"{where}.args.column: {column!r} is not a data column name")
        return exact_match_reward(column), (column,)
    _only_args(args, ("max_chars", "max_tokens"), where, name)
    given = [key for key in ("max_chars", "max_tokens") if key in args]
    if len(given) != 1:
        raise RewardError(f"{where}.args: length_penalty needs exactly one of max_chars or max_tokens")
    limit = _arg(args, given[0], int, where)
    if limit < 1:
        raise RewardError(f"{where}.args.{given[0]}: must be at least 1, got {limit}")
    return length_penalty_reward(**{given[0]: limit}), ()


BUILTINS = ("regex", "exact_match", "length_penalty")


# ------------------------------------------------------------------------------------ callables


def load_callable(spec: str, where: str) -> Callable[..., Any]:
    """`package.module:name` -> the object, imported the normal way; file paths are refused."""
    if not _CALLABLE.match(spec):
        raise RewardError(
            f"{where}.function: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor an importable "
            "callable 'package.module:function' (a module name, not a file path: put the file in an "
            "installed package or on PYTHONPATH)"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(
            f"{where}.function: cannot import module {module_name!r} ({exc}); it must be importable "
            "(installed, or its folder on PYTHONPATH)"
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise RewardError(
            f"{where}.function: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardError(f"{where}.function: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"{where}.function: {spec} is a {type(target).__name__}, not a callable")
    return target


def _accepted_keywords(
    fn: Callable[..., Any], args: dict[str, Any], where: str, spec: str
) -> frozenset[str] | None:
    """The keywords `fn` takes (None: it takes **kwargs); it must take prompts and completions."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call with everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    names = frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    missing = [name for name in ("prompts", "completions") if name not in names]
    if missing:
        raise RewardError(
            f"{where}.function: {spec} takes no {' or '.join(missing)} argument; a reward function is "
            "fn(prompts, completions, **kwargs) -> list[float]"
        )
    unknown = sorted(set(args) - names)
    if unknown:
        raise RewardError(f"{where}.args: {spec} takes no argument(s) {', '.join(unknown)}")
    return names


def load_rewards(entries: Sequence[RewardFunction]) -> list[Reward]:
    """Every `grpo.rewards` entry as a `Reward`; anything wrong is raised now, before training."""
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"grpo.rewards[{i}]"
        args = dict(entry.args)
        reserved = sorted(set(args) & set(RESERVED_KEYWORDS))
        if reserved:
            raise RewardError(f"{where}.args: {', '.join(reserved)} is passed by the trainer; rename it")
        columns: tuple[str, ...] = ()
        keywords: frozenset[str] | None = None
        if entry.function in BUILTINS:
            fn, columns = _builtin(entry.function, args, where)
            call_args: dict[str, Any] = {}  # built-in args are bound above
        else:
            fn = load_callable(entry.function, where)
            keywords = _accepted_keywords(fn, args, where, entry.function)
            call_args = args
        count = seen.get(entry.function, 0)
        seen[entry.function] = count + 1
        name = entry.function if count == 0 else f"{entry.function}#{i}"
        rewards.append(Reward(name, where, entry.weight, fn, call_args, columns, keywords))
    return rewards


def required_columns(rewards: Sequence[Reward]) -> dict[str, str]:
    """Column -> the entry that reads it, for reporting rows that lack it."""
    needed: dict[str, str] = {}
    for reward in rewards:
        for column in reward.columns:
            needed.setdefault(column, f"{reward.where} ({reward.name})")
    return needed


def score(
    rewards: Sequence[Reward],
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total (N,), per function (N, F)): the weighted sum (NaN counting 0), and each function's values."""
    per_function = torch.tensor(
        [reward(prompts, completions, completion_ids, columns) for reward in rewards], dtype=torch.float32
    ).T.reshape(len(completions), len(rewards))
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)
    return (per_function * weights).nansum(dim=1), per_function
