"""Multiple choice by log-likelihood: the prompt, the scoring engine, bad rows, and agreement with
lm-evaluation-harness's HF backend on the same tiny model and the same local task."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tiny_model_dir
from tunesmith.config.schema import EvalTask
from tunesmith.data.errors import DataError
from tunesmith.eval.loglik import encode_pair, loglikelihoods, make_request, model_max_length, score_requests
from tunesmith.eval.mc import evaluate_mc, load_items, plain_prompt

SUBJECTS = {
    "solar_system": [
        ("Which planet has the most visible rings?", ["Mars", "Saturn", "Venus", "Mercury"], 1),
        ("How many moons does Earth have?", ["None", "Two", "One", "Five"], 2),
        ("  What is the Sun?  ", ["A star", "A planet", "A moon", "A comet"], 0),
        ("Which planet is called the red planet?", ["Jupiter", "Neptune", "Uranus", "Mars"], 3),
    ],
    "kitchen_chemistry": [
        ("What gas makes bread dough rise?", ["Oxygen", "Carbon dioxide", "Helium", "Neon"], 1),
        ("Salt dissolved in water makes a", ["solution", "metal", "gas", "crystal lattice of ice"], 0),
        ("Vinegar is an example of an", ["base", "alloy", "acid", "oil"], 2),
    ],
}
DEV = {
    "solar_system": [
        ("What is the closest star to Earth?", ["The Moon", "The Sun", "Sirius", "Vega"], 1),
        ("What do planets orbit?", ["Stars", "Comets", "Clouds", "Moons"], 0),
    ],
    "kitchen_chemistry": [
        ("Water boils at what temperature at sea level?", ["50 C", "100 C", "150 C", "0 C"], 1),
        ("Ice is water in which state?", ["Gas", "Plasma", "Liquid", "Solid"], 3),
    ],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("mc") / "llama", tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any]:
    from tunesmith.models.load import load_model, load_tokenizer

    return load_model(tiny_dir).eval(), load_tokenizer(tiny_dir)


def _row(subject: str, question: str, choices: list[str], answer: int, **extra: Any) -> dict[str, Any]:
    return {"subject": subject, "question": question, "choices": choices, "answer": answer, **extra}


def write_task(folder: Path) -> Path:
    """Our format: test rows interleaved across subjects, dev rows marked `split: dev`, some answers as letters."""
    rows = []
    for subject, items in DEV.items():
        rows += [_row(subject, q, c, a, split="dev") for q, c, a in items]
    for n in range(4):
        for subject, items in SUBJECTS.items():
            if n < len(items):
                q, c, a = items[n]
                rows.append(_row(subject, q, c, "ABCD"[a] if n % 2 else a))
    path = folder / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TEMPLATE = """task: t_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {about}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_harness_tasks(folder: Path) -> list[str]:
    """The same questions as lm-eval tasks, one per subject, the MMLU template pointed at local files."""
    names = []
    for subject in SUBJECTS:
        for split, source in (("test", SUBJECTS), ("dev", DEV)):
            rows = [{"question": q, "choices": c, "answer": a} for q, c, a in source[subject]]
            (folder / f"{subject}_{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
            )
        (folder / f"t_{subject}.yaml").write_text(
            TEMPLATE.format(
                subject=subject,
                about=subject.replace("_", " "),
                test=folder / f"{subject}_test.jsonl",
                dev=folder / f"{subject}_dev.jsonl",
            ),
            encoding="utf-8",
        )
        names.append(f"t_{subject}")
    return names


def run_lm_eval(model_dir: Path, folder: Path, shots: int, chat: bool = False) -> dict[str, Any]:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    names = write_harness_tasks(folder)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=names,
        num_fewshot=shots,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),  # local tasks only: fast
        log_samples=True,
        batch_size=8,
        device="cpu",
        apply_chat_template=chat,
    )


def assert_agrees(ours: Any, theirs: dict[str, Any]) -> float:
    """Per item log-likelihoods within 1e-4, acc/acc_norm exactly, per subject and overall."""
    assert ours.samples is not None
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for sample in ours.samples:
        by_subject.setdefault(sample["subject"], []).append(sample)
    worst = 0.0
    total = 0
    for subject, mine in by_subject.items():
        harness = sorted(theirs["samples"][f"t_{subject}"], key=lambda s: s["doc_id"])
        assert len(harness) == len(mine)
        total += len(mine)
        for a, b in zip(mine, harness, strict=True):
            reference = [resp[0][0] for resp in b["resps"]]
            diffs = [abs(x - y) for x, y in zip(a["loglikelihoods"], reference, strict=True)]
            worst = max(worst, *diffs)
            assert max(diffs) < 1e-4, (subject, a["doc_id"], a["loglikelihoods"], reference)
            assert a["is_greedy"] == [resp[0][1] for resp in b["resps"]]
            assert a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]
        result = theirs["results"][f"t_{subject}"]
        assert ours.metrics[f"acc/{subject}"] == pytest.approx(result["acc,none"], abs=1e-12)
        assert ours.metrics[f"acc_norm/{subject}"] == pytest.approx(result["acc_norm,none"], abs=1e-12)
    assert total == ours.n
    weighted = sum(theirs["results"][f"t_{s}"]["acc,none"] * len(v) for s, v in SUBJECTS.items()) / total
    assert ours.metrics["acc"] == pytest.approx(weighted, abs=1e-12)
    return worst


def test_agrees_with_lm_eval_zero_shot(tiny: tuple[Any, Any], tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny
    task = EvalTask(kind="mc", path=str(write_task(tmp_path)))
    ours = evaluate_mc(model, tokenizer, task, log_samples=True)
    assert ours.n == 7
    assert assert_agrees(ours, run_lm_eval(tiny_dir, tmp_path / "harness", 0)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_agrees_with_lm_eval_two_shot(
    tiny: tuple[Any, Any], tiny_dir: Path, tmp_path: Path, chat: bool
) -> None:
    model, tokenizer = tiny
    if chat and not tokenizer.chat_template:
        pytest.skip("the tokenizer has no chat template")
    task = EvalTask(kind="mc", path=str(write_task(tmp_path)), shots=2, chat_template=chat)
    ours = evaluate_mc(model, tokenizer, task, log_samples=True, batch_tokens=512)
    assert assert_agrees(ours, run_lm_eval(tiny_dir, tmp_path / "harness", 2, chat=chat)) < 1e-4


def test_one_shot_prompt_is_the_mmlu_string(tmp_path: Path) -> None:
    items = load_items(write_task(tmp_path))
    dev = [i for i in items if i.split == "dev" and i.subject == "solar_system"]
    test = [i for i in items if i.split is None and i.subject == "solar_system"]
    expected = (
        "The following are multiple choice questions (with answers) about solar system.\n\n"
        "What is the closest star to Earth?\nA. The Moon\nB. The Sun\nC. Sirius\nD. Vega\nAnswer: B\n\n"
        "What is the Sun?\nA. A star\nB. A planet\nC. A moon\nD. A comet\nAnswer:"
    )
    assert plain_prompt(test[2], dev[:1]) == expected


def _reference(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """One unpacked forward per pair, plain transformers, as lm-eval scores it."""
    out = []
    max_length = model_max_length(model, tokenizer)
    for context, continuation in pairs:
        request = make_request(*encode_pair(tokenizer, context, continuation), max_length)
        with torch.no_grad():
            logits = model(torch.tensor([request.inputs])).logits[0, -len(request.targets) :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(request.targets)
        out.append(
            (
                float(logprobs.gather(1, targets[:, None]).sum()),
                bool((logprobs.argmax(-1) == targets).all()),
            )
        )
    return out


PAIRS = [
    ("Question: which is a fruit?\nAnswer:", " an apple from the tree"),
    ("Question: which is a fruit?\nAnswer:", " a carrot"),
    ("Question: which is a fruit?\nAnswer:", " A"),
    ("Question: which is a fruit?\nAnswer:", " a small grey stone found by the river"),
    ("The sky is ", "blue"),
    ("The sky is ", "green and purple"),
    ("", "Hello there"),
    ("Colours: red, green,", " B"),
    ("Colours: red, green,", " C"),
    ("Colours: red, green,", " D"),
]


@pytest.mark.parametrize(("batch_tokens", "min_shared"), [(16, 1), (4096, 1), (4096, 32), (16, 32)])
def test_prefix_reuse_equals_one_pair_per_row(
    tiny: tuple[Any, Any], batch_tokens: int, min_shared: int
) -> None:
    """Shared runs as KV caches (min_shared 1: every shared run, also across questions), packed rows of
    several inputs (4096) or one (16): all equal an unpacked forward per pair."""
    model, tokenizer = tiny
    shared = loglikelihoods(model, tokenizer, PAIRS, batch_tokens=batch_tokens, min_shared=min_shared)
    plain = loglikelihoods(model, tokenizer, PAIRS, batch_tokens=batch_tokens, prefix_reuse=False)
    reference = _reference(model, tokenizer, PAIRS)
    for a, b, c in zip(shared, plain, reference, strict=True):
        # sums of ~80 log-probs: float32 reduction order (thread count) moves them by ~1e-7 relative
        assert a[0] == pytest.approx(c[0], rel=1e-6, abs=1e-5) and b[0] == pytest.approx(
            c[0], rel=1e-6, abs=1e-5
        )
        assert a[1] == b[1] == c[1]
    assert model.config._attn_implementation == "sdpa"  # the kernel switches are undone


def test_packed_rows_do_not_attend_across_samples(tiny: tuple[Any, Any]) -> None:
    """A sample scored alone and packed behind another one gives the same number."""
    model, tokenizer = tiny
    max_length = model_max_length(model, tokenizer)
    requests = [make_request(*encode_pair(tokenizer, c, k), max_length) for c, k in PAIRS[4:8]]
    alone = [score_requests(model, [r])[0][0] for r in requests]
    together = [s for s, _ in score_requests(model, requests, batch_tokens=4096)]
    assert together == pytest.approx(alone, abs=1e-5)


def test_left_truncation_matches_lm_eval_rule() -> None:
    request = make_request([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert request.inputs == (3, 4, 5, 6) and request.targets == (6, 7)


def test_limit_and_file_order(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = write_task(tmp_path)
    full = evaluate_mc(model, tokenizer, EvalTask(kind="mc", path=str(path)), log_samples=True)
    part = evaluate_mc(model, tokenizer, EvalTask(kind="mc", path=str(path), limit=3), log_samples=True)
    assert part.n == 3 and part.per_item["acc"] == full.per_item["acc"][:3]
    assert [s["target"] for s in full.samples or []] == [1, 1, 2, 0, 0, 2, 3]
    assert part.task == f"mc:{path}"


def test_csv_with_letter_columns_equals_jsonl(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = write_task(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    csv_path = tmp_path / "task.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["subject", "question", "A", "B", "C", "D", "answer", "split"])
        writer.writeheader()
        for row in rows:
            flat = {k: v for k, v in row.items() if k != "choices"}
            writer.writerow({**flat, **dict(zip("ABCD", row["choices"], strict=True))})
    a = evaluate_mc(model, tokenizer, EvalTask(kind="mc", path=str(path), shots=1), log_samples=True)
    b = evaluate_mc(model, tokenizer, EvalTask(kind="mc", path=str(csv_path), shots=1), log_samples=True)
    assert [s["loglikelihoods"] for s in a.samples or []] == [s["loglikelihoods"] for s in b.samples or []]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?", "answer": 0}, "'choices'"),
        ({"question": "Q?", "choices": ["x", "y"], "answer": 2}, "out of range"),
        ({"question": "Q?", "choices": ["x", "y", "z"], "answer": "D"}, "letter (A, B, C)"),
        ({"choices": ["x", "y"], "answer": 0}, "'question'"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"question": "Fine?", "choices": ["yes", "no"], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        load_items(path)


def test_too_few_dev_rows_is_a_data_error(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    task = EvalTask(kind="mc", path=str(write_task(tmp_path)), shots=3)
    with pytest.raises(DataError, match="3 shots asked.*2 dev rows"):
        evaluate_mc(model, tokenizer, task)


def test_shipped_example_task_loads() -> None:
    items = load_items(Path(__file__).parents[2] / "examples" / "eval" / "mc_science.jsonl")
    test = [i for i in items if i.split != "dev"]
    assert len(test) == 20 and len({i.subject for i in test}) == 3
    for subject in {i.subject for i in test}:
        assert sum(1 for i in items if i.split == "dev" and i.subject == subject) == 5
