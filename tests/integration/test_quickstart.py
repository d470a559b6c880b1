"""The quickstart teaches the default model its new identity (slow: the real model, about two minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config.load import load_config
from tunesmith.infer.generate import generate_reply
from tunesmith.infer.loading import load_for_inference
from tunesmith.training.loop import train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _held_out_questions() -> list[str]:
    lines = (REPO / "examples/data/identity_eval.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"][0]["content"] for line in lines]


def _knows_identity(model, tokenizer, question: str) -> bool:
    answer = generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=40)
    return "quill" in answer.lower() or "tunesmith" in answer.lower()


def test_quickstart_teaches_the_new_identity_on_held_out_questions(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config names its data relative to the repository root
    questions = _held_out_questions()
    training = {row for row in (REPO / "examples/data/identity.jsonl").read_text().splitlines()}
    assert not any(q in row for q in questions for row in training)  # held out for real

    base, tokenizer = load_for_inference("default")
    assert sum(_knows_identity(base, tokenizer, q) for q in questions) == 0

    cfg = load_config(REPO / "examples/quickstart.yaml", {"output.dir": str(tmp_path / "run")})
    result = train(cfg, show_progress=False)
    losses = result.losses
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5

    tuned, tokenizer = load_for_inference(str(tmp_path / "run"))
    knows = sum(_knows_identity(tuned, tokenizer, q) for q in questions)
    assert knows >= 0.75 * len(questions), f"{knows} of {len(questions)} held-out questions"
