"""Generation tasks: greedy answers equal plain HF generation, and each match mode scores them right."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.config.load import ConfigError
from tunesmith.config.schema import EvalTask
from tunesmith.data.errors import DataError
from tunesmith.eval.gen import NUMBER, evaluate_gen, last_match, load_function, matcher

PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Say hi.", "What is 3 times 3?", "Count to three."]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    from tunesmith.models.load import load_model, load_tokenizer

    model_dir = tiny_model_dirs["llama"]
    return load_model(model_dir).eval(), load_tokenizer(model_dir)


def _reference(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new: int) -> str:
    """One prompt at a time through HF generate, stopping at the ChatML end of turn."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = ids["input_ids"]
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, 2]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_outputs_equal_plain_generation_and_exact_match_counts_right(loaded, tmp_path):
    model, tokenizer = loaded
    rows = [{"prompt": p, "answer": "?"} for p in PROMPTS]
    rows.append(
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
            "answer": "?",
        }
    )
    rows.append({"question": "Say hi.", "answer": "?"})  # same length as row 2: generated in one batch
    first = evaluate_gen(
        model,
        tokenizer,
        EvalTask(kind="gen", path=_write(tmp_path / "a.jsonl", rows), max_new_tokens=6),
        log_samples=True,
    )
    expected = [
        _reference(
            model,
            tokenizer,
            r.get("messages") or [{"role": "user", "content": r.get("prompt", r.get("question"))}],
            6,
        )
        for r in rows
    ]
    assert [s["generated"] for s in first.samples] == expected
    assert first.samples[0]["prompt"].endswith("<|im_start|>assistant\n")
    # gold = the model's own output for rows 0, 2 and 5: exact match 3/7
    for i in (0, 2, 5):
        rows[i]["answer"] = f"  {expected[i]} "
    task = EvalTask(kind="gen", path=_write(tmp_path / "b.jsonl", rows), max_new_tokens=6)
    result = evaluate_gen(model, tokenizer, task)
    assert result.metrics == {"exact_match": pytest.approx(3 / 7)}
    assert result.per_item["exact_match"] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    one_by_one = evaluate_gen(model, tokenizer, task, batch_size=1)
    assert one_by_one.per_item == result.per_item


def test_contains_regex_and_callable_modes(loaded, tmp_path):
    model, tokenizer = loaded
    base = [{"prompt": p, "answer": "?"} for p in PROMPTS[:3]]
    path = _write(tmp_path / "a.jsonl", base)
    outputs = [
        s["generated"]
        for s in evaluate_gen(
            model, tokenizer, EvalTask(kind="gen", path=path, max_new_tokens=6), log_samples=True
        ).samples
    ]
    rows = [
        dict(r, answer=o[1:4] if i == 1 else "zzzz-not-there")
        for i, (r, o) in enumerate(zip(base, outputs, strict=True))
    ]
    task = EvalTask(kind="gen", path=_write(tmp_path / "c.jsonl", rows), max_new_tokens=6, match="contains")
    assert evaluate_gen(model, tokenizer, task).per_item["contains"] == [0.0, 1.0, 0.0]

    scorer = tmp_path / "my_score.py"
    scorer.write_text(
        "def score(prediction, answer, row):\n    return len(prediction) / 100 + row['bonus']\n"
    )
    rows = [dict(r, bonus=i) for i, r in enumerate(base)]
    task = EvalTask(
        kind="gen",
        path=_write(tmp_path / "d.jsonl", rows),
        max_new_tokens=6,
        match="callable",
        function=f"{scorer}:score",
    )
    result = evaluate_gen(model, tokenizer, task)
    assert result.per_item["score"] == pytest.approx([len(o) / 100 + i for i, o in enumerate(outputs)])
    assert result.metrics["score"] == pytest.approx(sum(result.per_item["score"]) / 3)


def test_regex_extraction():
    extract, score = matcher(EvalTask(kind="gen", path="x", match="regex"))
    assert extract("First 12, then 3,400 apples.") == "3400"
    assert extract("The answer is -2.5.") == "-2.5"
    assert extract("no number") == ""
    assert score(extract("so it is 1,000."), "1000", {}) and score("1000", "1,000", {})
    assert not score(extract("it is 100"), "1000", {})
    extract, score = matcher(EvalTask(kind="gen", path="x", match="regex", pattern=r"answer: (\w+)"))
    assert extract("answer: cat ... answer: dog") == "dog" and score("dog", " dog ", {})
    assert last_match(re.compile(NUMBER), "7 and 8") == "8"
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        matcher(EvalTask(kind="gen", path="x", match="regex", pattern="(unclosed"))
    extract, score = matcher(EvalTask(kind="gen", path="x", match="exact"))
    assert score(extract(" Paris \n"), "Paris", {}) and not score("Paris.", "Paris", {})


def test_functions_that_do_not_resolve_are_config_errors(tmp_path):
    assert load_function("os.path:join") is __import__("os").path.join
    for spec, why in [
        ("no_such_module_xyz:f", "cannot import"),
        ("os.path:nope", "no function"),
        (f"{tmp_path}/missing.py:f", "no such local file"),
        ("justaname", "module:function"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_function(spec)
    with pytest.raises(ConfigError, match="needs a function"):
        matcher(EvalTask(kind="gen", path="x", match="callable"))


def test_bad_rows_name_their_line(loaded, tmp_path):
    model, tokenizer = loaded
    path = _write(tmp_path / "e.jsonl", [{"prompt": "Hi", "answer": "x"}, {"answer": "y"}])
    with pytest.raises(DataError, match="e.jsonl:2"):
        evaluate_gen(model, tokenizer, EvalTask(kind="gen", path=path, max_new_tokens=2))
    path = _write(
        tmp_path / "f.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "answer": "b",
            }
        ],
    )
    with pytest.raises(DataError, match="end with a user turn"):
        evaluate_gen(model, tokenizer, EvalTask(kind="gen", path=path, max_new_tokens=2))
