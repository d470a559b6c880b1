"""Multiple-choice tasks scored by log-likelihood, in lm-evaluation-harness's MMLU format.

A task file (jsonl, json, csv or parquet) holds one question per row: `question`, `choices` (a list;
in csv a JSON list, or one column per letter A, B, ...), `answer` (0-based index or letter),
optional `subject` and `split`. Rows with `split: dev` are the few-shot pool unless `dev_path`
names another file. The prompt is the harness's MMLU prompt, character for character:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {dev question}\\nA. ..\\nB. ..\\nAnswer: {letter}\\n\\n      (the first k dev rows of the subject)
    {question}\\nA. ..\\nB. ..\\nAnswer:

and the choices are scored as the continuations " A", " B", ... (`acc`: the highest log-likelihood
is the gold one; `acc_norm`: log-likelihood divided by the choice's length in characters, as the
harness defines it — for letters the same ranking). With `chat_template` the prompt goes through
the tokenizer's chat template as the harness's `--apply_chat_template` renders it (few-shot as
multi-turn, its default): the description as the system turn, each shot a user and an assistant
turn, the question a user turn with the generation prompt, and the continuations "A", "B", ...

Metrics are means over items, overall and per subject (`acc/<subject>`). The harness reports each
subject as its own task and aggregates the `mmlu` group weighted by size, which is the same mean
over all items; so `acc/<subject>` matches its per-task numbers and `acc` its group number.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.schema import EvalTask
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError
from tunesmith.eval.loglik import loglikelihoods
from tunesmith.eval.results import TaskResult

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Item:
    """One validated question."""

    question: str
    choices: list[str]
    answer: int
    subject: str | None
    split: str | None
    ref: RowRef


def read_rows(path: Path) -> list[tuple[RowRef, dict[str, Any]]]:
    """Raw rows with where they came from; a row that is not an object is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: multiple-choice task file not found")
    suffix = path.suffix.lower()
    rows: list[tuple[RowRef, Any]] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    rows.append((RowRef(str(path), number), _json(line, RowRef(str(path), number))))
    elif suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), RowRef(str(path), 1))
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json task file holds a list of question objects")
        rows = [(RowRef(str(path), n, unit="row"), row) for n, row in enumerate(data, start=1)]
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append(
                    (RowRef(str(path), reader.line_num), _from_csv(row, RowRef(str(path), reader.line_num)))
                )
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pylist()
        rows = [(RowRef(str(path), n, unit="row"), row) for n, row in enumerate(table, start=1)]
    else:
        raise DataError(f"{path}: a multiple-choice task is a .jsonl, .json, .csv or .parquet file")
    for ref, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{ref}: a question is an object with question, choices and answer")
    return rows


def _json(text: str, ref: RowRef) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{ref}: not valid JSON ({exc.msg})") from exc


def _from_csv(row: dict[str, str], ref: RowRef) -> dict[str, Any]:
    """`choices` as a JSON list, or columns A, B, C, ... in order."""
    out: dict[str, Any] = dict(row)
    if row.get("choices"):
        out["choices"] = _json(row["choices"], ref)
    else:
        letters = [letter for letter in LETTERS if letter in row]
        out["choices"] = [row[letter] for letter in letters] if letters else None
    return out


def parse_item(ref: RowRef, row: dict[str, Any]) -> Item:
    """Validate one row; every problem names the file and row."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{ref}: 'question' is missing or empty")
    choices = row.get("choices")
    if hasattr(choices, "tolist"):
        choices = choices.tolist()
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{ref}: 'choices' must be a list of at least 2 answers, got {choices!r}")
    if len(choices) > len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{ref}: 'choices' must be at most {len(LETTERS)} strings, got {choices!r}")
    answer = _answer_index(row.get("answer"), len(choices), ref)
    subject = row.get("subject")
    split = row.get("split")
    return Item(
        question=question,
        choices=list(choices),
        answer=answer,
        subject=str(subject) if subject not in (None, "") else None,
        split=str(split) if split not in (None, "") else None,
        ref=ref,
    )


def _answer_index(answer: Any, n: int, ref: RowRef) -> int:
    letters = LETTERS[:n]
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, int):
        if 0 <= answer < n:
            return answer
        raise DataError(f"{ref}: 'answer' {answer} is out of range for {n} choices (0 to {n - 1})")
    if isinstance(answer, str) and answer.strip().upper() in letters and len(answer.strip()) == 1:
        return letters.index(answer.strip().upper())
    raise DataError(
        f"{ref}: 'answer' must be a choice index (0 to {n - 1}) or a letter ({', '.join(letters)}), got {answer!r}"
    )


def load_items(path: Path) -> list[Item]:
    return [parse_item(ref, row) for ref, row in read_rows(path)]


def description(subject: str | None) -> str:
    """The harness's MMLU description line (its per-subject YAMLs: underscores become spaces)."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def doc_to_text(item: Item) -> str:
    """MMLU's `doc_to_text`: the stripped question, one `X. choice` line per choice, then `Answer:`."""
    lines = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question.strip()}{lines}\nAnswer:"


def plain_prompt(item: Item, shots: list[Item]) -> str:
    """The harness's plain-text few-shot context for `item`."""
    examples = "".join(f"{doc_to_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(item.subject) + examples + doc_to_text(item)


def chat_messages(item: Item, shots: list[Item]) -> list[dict[str, str]]:
    """The turns the harness builds under `--apply_chat_template` (few-shot as multi-turn)."""
    messages = [{"role": "system", "content": description(item.subject)}]
    for shot in shots:
        messages.append({"role": "user", "content": doc_to_text(shot)})
        messages.append({"role": "assistant", "content": LETTERS[shot.answer]})
    messages.append({"role": "user", "content": doc_to_text(item)})
    return messages


def chat_prompt(tokenizer: Any, item: Item, shots: list[Item]) -> str:
    """Rendered like `HFLM.apply_chat_template`: a template that refuses the system turn gets none."""
    import jinja2

    messages = chat_messages(item, shots)
    options = dict(tokenize=False, add_generation_prompt=True, continue_final_message=False)
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except jinja2.exceptions.TemplateError:
        return tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], **options)


def split_items(task: EvalTask) -> tuple[list[Item], list[Item]]:
    """(test items, few-shot pool): rows marked `split: dev` are the pool unless `dev_path` is set."""
    items = load_items(Path(task.path))
    test = [item for item in items if item.split != "dev"]
    pool = load_items(Path(task.dev_path)) if task.dev_path else [i for i in items if i.split == "dev"]
    if task.limit is not None:
        test = test[: task.limit]
    return test, pool


def shots_for(item: Item, pool: list[Item], k: int, source: str) -> list[Item]:
    """The first `k` pool rows of the item's subject (the harness's `first_n` sampler)."""
    if k == 0:
        return []
    same = [shot for shot in pool if shot.subject == item.subject]
    if len(same) < k:
        raise DataError(
            f"{item.ref}: {k} shots asked, but {source} holds {len(same)} dev rows for subject "
            f"{item.subject!r}; lower shots or add dev rows (split: dev) for that subject"
        )
    return same[:k]


def evaluate_mc(
    model: Any,
    tokenizer: Any,
    task: EvalTask,
    *,
    log_samples: bool = False,
    batch_tokens: int = 8192,
) -> TaskResult:
    """Score every test item of `task`; see the module docstring for the prompt and metrics."""
    test, pool = split_items(task)
    if not test:
        raise DataError(f"{task.path}: no test questions (every row is marked split: dev)")
    source = task.dev_path or f"{task.path} (rows with split: dev)"
    delimiter = "" if task.chat_template else " "
    pairs: list[tuple[str, str]] = []
    for item in test:
        shots = shots_for(item, pool, task.shots, source)
        context = chat_prompt(tokenizer, item, shots) if task.chat_template else plain_prompt(item, shots)
        pairs.extend((context, delimiter + LETTERS[i]) for i in range(len(item.choices)))
    scores = loglikelihoods(model, tokenizer, pairs, batch_tokens=batch_tokens)
    acc: list[float] = []
    acc_norm: list[float] = []
    samples: list[dict[str, Any]] = []
    offset = 0
    for doc_id, item in enumerate(test):
        scored = scores[offset : offset + len(item.choices)]
        offset += len(item.choices)
        lls = [ll for ll, _ in scored]
        lengths = [float(len(LETTERS[i])) for i in range(len(item.choices))]  # the choice, not the delimiter
        pred = _argmax(lls)
        pred_norm = _argmax([ll / n for ll, n in zip(lls, lengths, strict=True)])
        acc.append(float(pred == item.answer))
        acc_norm.append(float(pred_norm == item.answer))
        if log_samples:
            samples.append(
                {
                    "doc_id": doc_id,
                    "subject": item.subject,
                    "source": str(item.ref),
                    "loglikelihoods": lls,
                    "is_greedy": [greedy for _, greedy in scored],
                    "prediction": pred,
                    "prediction_norm": pred_norm,
                    "target": item.answer,
                    "acc": acc[-1],
                    "acc_norm": acc_norm[-1],
                }
            )
    metrics = {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}
    subjects = sorted({item.subject for item in test if item.subject is not None})
    for subject in subjects:
        index = [n for n, item in enumerate(test) if item.subject == subject]
        metrics[f"acc/{subject}"] = _mean([acc[n] for n in index])
        metrics[f"acc_norm/{subject}"] = _mean([acc_norm[n] for n in index])
    return TaskResult(
        task=f"mc:{task.path}",
        n=len(test),
        metrics=metrics,
        per_item={"acc": acc, "acc_norm": acc_norm},
        samples=samples if log_samples else None,
    )


def _argmax(values: list[float]) -> int:
    """The first index of the largest value, as numpy's argmax breaks ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
