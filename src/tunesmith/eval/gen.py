"""Generation tasks: greedy answers through the chat template, compared with a gold answer.

A row holds a prompt (`prompt` or `question` as a string, optionally with a `system` string, or
OpenAI `messages` ending with a user turn) and a gold `answer`. The prompt is rendered with the
model's chat template and its generation prompt, and answered greedily until the end-of-turn token
(or eos, or `max_new_tokens`) by `infer.generate`. Prompts of the same length are generated together,
so batching adds no padding and does not change the answers.

Matching (`task.match`), each reported as one metric, a mean over items:
- `exact`: the stripped output equals the stripped answer -> `exact_match`;
- `regex`: the last match of `task.pattern` (its first group if it has one) equals the answer ->
  `exact_match`; without a pattern, the last number (GSM8K-style), commas removed on both sides;
- `contains`: the answer appears in the output -> `contains`;
- `callable`: `task.function` (`module:function` or `path/file.py:function`), called as
  `fn(prediction, answer, row)` and returning a bool or a float -> `score`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.load import ConfigError
from tunesmith.config.schema import EvalTask
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.eval.results import TaskResult

NUMBER = r"-?[\d,]*\.?\d+"
"""The default `regex` pattern: a number, possibly negative, with thousands separators or decimals."""
METRIC = {"exact": "exact_match", "regex": "exact_match", "contains": "contains", "callable": "score"}
BATCH_SIZE = 8

Row = dict[str, Any]
Scorer = Callable[[str, str, Row], float]


def evaluate_gen(
    model: Any, tokenizer: Any, task: EvalTask, *, log_samples: bool = False, batch_size: int = BATCH_SIZE
) -> TaskResult:
    """The task's metric (see the module docstring) over its rows, in file order."""
    from tunesmith.infer.generate import generate_batch, prompt_ids, reply_stop_ids
    from tunesmith.training.rollout import generation_mode

    extract, score = matcher(task)
    rows = read_rows(task)
    conversations = [prompt_messages(row, ref) for ref, row in rows]
    prompts = [prompt_ids(tokenizer, messages)[0].tolist() for messages in conversations]
    outputs: list[str] = [""] * len(rows)
    with generation_mode(model) as lm:
        stop_ids = reply_stop_ids(lm, tokenizer)
        for group in same_length_batches(prompts, batch_size):
            generated = generate_batch(
                lm,
                [prompts[i] for i in group],
                max_new_tokens=task.max_new_tokens,
                stop_ids=stop_ids,
                pad_id=tokenizer.pad_token_id,
            )
            for i, (tokens, _) in zip(group, generated, strict=True):
                outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    metric = METRIC[task.match]
    scores, samples = [], []
    for (ref, row), messages, output in zip(rows, conversations, outputs, strict=True):
        answer = gold_answer(row, ref)
        prediction = extract(output)
        value = float(score(prediction, answer, row))
        scores.append(value)
        if log_samples:
            samples.append(
                {
                    "prompt": tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    ),
                    "generated": output,
                    "prediction": prediction,
                    "answer": answer,
                    metric: value,
                }
            )
    return TaskResult(
        task=f"gen:{task.path}",
        n=len(rows),
        metrics={metric: sum(scores) / len(scores)},
        per_item={metric: scores},
        samples=samples if log_samples else None,
    )


def read_rows(task: EvalTask) -> list[tuple[RowRef, Row]]:
    """The task file's rows in order (the first `task.limit`); an unreadable row stops with its line."""
    from tunesmith.data.sources import iter_rows
    from tunesmith.eval.perplexity import LABEL, plain_path_errors

    rows = []
    with plain_path_errors():
        found = iter_rows(task.path, LABEL)
    for ref, row in found:
        if isinstance(row, RowIssue):
            raise DataError(str(row))
        rows.append((ref, row))
        if task.limit is not None and len(rows) == task.limit:
            break
    if not rows:
        raise DataError(f"{task.path}: no rows")
    return rows


def prompt_messages(row: Row, ref: RowRef) -> list[dict[str, str]]:
    """The conversation to answer: `messages` ending with a user turn, or a `prompt`/`question`."""
    messages = row.get("messages")
    if messages is not None:
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise DataError(f"{ref}: messages must be a non-empty list of {{role, content}} objects")
        if messages[-1].get("role") != "user":
            raise DataError(f"{ref}: messages must end with a user turn (the one the model answers)")
        return [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in messages]
    text = row.get("prompt", row.get("question"))
    if not isinstance(text, str):
        raise DataError(f'{ref}: a generation row needs "prompt" or "question" (a string), or "messages"')
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return head + [{"role": "user", "content": text}]


def gold_answer(row: Row, ref: RowRef) -> str:
    answer = row.get("answer")
    if answer is None or isinstance(answer, dict | list):
        raise DataError(f'{ref}: a generation row needs "answer" (a string or a number)')
    return str(answer)


def same_length_batches(prompts: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices of prompts grouped by length, at most `size` a group, in order of first appearance."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    return [group[s : s + size] for group in by_length.values() for s in range(0, len(group), size)]


# --- matching -----------------------------------------------------------------------------------


def matcher(task: EvalTask) -> tuple[Callable[[str], str], Scorer]:
    """(output -> prediction, (prediction, answer, row) -> score) for `task.match`."""
    if task.match == "exact":
        return str.strip, lambda p, a, _: p == a.strip()
    if task.match == "contains":
        return str.strip, lambda p, a, _: a.strip() in p
    if task.match == "regex":
        default = task.pattern is None
        try:
            pattern = re.compile(NUMBER if default else task.pattern)
        except re.error as exc:
            raise ConfigError(
                f"--pattern {task.pattern!r} is not a valid regular expression: {exc}"
            ) from None

        def extract(output: str) -> str:
            found = last_match(pattern, output)
            return _number(found) if default else found

        return extract, lambda p, a, _: p == (_number(a) if default else a.strip())
    if task.function is None:
        raise ConfigError("match callable needs a function: --function module:function or file.py:function")
    fn = load_function(task.function)
    return str.strip, fn


def last_match(pattern: re.Pattern[str], text: str) -> str:
    """The last match (its first group where the pattern has groups), stripped; '' when none."""
    found = ""
    for match in pattern.finditer(text):
        found = match.group(1) if pattern.groups else match.group(0)
    return (found or "").strip()


def _number(text: str) -> str:
    return text.strip().replace(",", "").rstrip(".")


def load_function(spec: str) -> Scorer:
    """`module:function` (imported) or `path/file.py:function` (a local file, loaded from disk)."""
    where = f"--function {spec!r}"
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ConfigError(f"{where}: name a function as module:function or path/file.py:function")
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where}: no such local file {path}")
        module_name = f"tunesmith_eval_fn_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"{where}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"{where}: running {path} raised {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise ConfigError(f"{where}: cannot import module {source!r} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {source} has no function {name!r}")
    return fn
