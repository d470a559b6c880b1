"""Synthesized data trains as it is: every row read, none dropped, labels exactly on the answers.

A stub OpenAI-compatible endpoint (httpx.MockTransport; the client and pipeline are the real ones)
answers the synth run; the output, in each format and with and without reasoning blocks, goes
through `tunesmith.training.loop.train` on a tiny random model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import base_config, make_tiny_model_dir
from tunesmith.config.load import load_config
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.synth.config import SynthConfig
from tunesmith.synth.pipeline import synthesize
from tunesmith.training.loop import train
from tunesmith.training.methods import get_method

DOC = """# Valves

The relief valve opens at six bar. It closes again at five bar.

# Motors

The motor runs at 1450 revolutions per minute. The motor must be earthed before it is switched on.
"""
QA = {
    "relief valve": [
        ("At what pressure does the relief valve open?", "The relief valve opens at six bar."),
        ("When does the relief valve close again?", "It closes again at five bar."),
    ],
    "1450": [
        ("How fast does the motor run?", "The motor runs at 1450 revolutions per minute."),
        ("What must be done before the motor is switched on?", "The motor must be earthed first."),
    ],
}
ANSWERS = dict(pair for pairs in QA.values() for pair in pairs)


def reasoning_for(question: str) -> str:
    return f"The text states this directly; the question was: {question}"


class CleanStub:
    """Well-formed replies; with `reasoning` the answer comes after a <think> block, or (`field`) in
    `reasoning_content` the way vLLM's reasoning parsers return it."""

    def __init__(self, reasoning: str | None = None) -> None:
        self.reasoning = reasoning

    def __call__(self, request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][-1]["content"]
        message: dict[str, Any] = {"role": "assistant"}
        if user.startswith("Read the text"):
            pairs = next(v for k, v in QA.items() if k in user)
            message["content"] = json.dumps([q for q, _ in pairs])
        else:
            q = user.split("Question: ", 1)[1].split("\n", 1)[0]
            answer = ANSWERS[q]
            if self.reasoning == "inline" and "<think>" in user:
                message["content"] = f"<think>\n{reasoning_for(q)}\n</think>\n\n{answer}"
            elif self.reasoning == "field" and "<think>" in user:
                message["content"], message["reasoning_content"] = answer, reasoning_for(q)
            else:
                message["content"] = answer
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("synth-train") / "llama", tokenizer_dir)


def _synth(tmp_path: Path, fmt: str, reasoning: str = "off", stub: CleanStub | None = None) -> Path:
    doc = tmp_path / "manual.md"
    doc.write_text(DOC, encoding="utf-8")
    out = tmp_path / f"{fmt}.jsonl"
    cfg = SynthConfig.model_validate(
        {
            "endpoint": "http://stub/v1",
            "questions_per_chunk": 2,
            "format": fmt,
            "reasoning": reasoning,
            "backoff_s": 0,
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    summary = synthesize([str(doc)], out, cfg, transport=httpx.MockTransport(stub or CleanStub()))
    assert summary.rows_kept == len(ANSWERS) and summary.skipped == []
    return out


def _expected_trained_text(tokenizer: Any, question: str, content: str) -> str:
    """The tokenizer's own rendering: the full conversation minus the prompt with the generation prompt."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": content}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    return full[len(prompt) :]


def _train_and_check(
    model_dir: Path, data: Path, run_dir: Path, tokenizer: Any, answers: dict[str, str], **data_cfg: Any
) -> None:
    cfg = load_config(
        base_config(
            model_dir,
            data,
            run_dir,
            data={"shuffle": False, **data_cfg},
            train={"max_steps": 3, "batch_size": 2},
        )
    )
    report = get_method("sft").prepare_data(cfg, tokenizer).data
    r = report.report
    assert (r.rows_read, r.train_samples, r.truncated) == (len(answers), len(answers), 0)
    assert r.skipped == [] and r.dropped == []
    assert len(report.train) == len(answers)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for sample in report.train:
        labelled = [i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX]
        # one contiguous run of labels, equal to the input ids there
        assert labelled == list(range(labelled[0], labelled[-1] + 1))
        assert [sample.labels[i] for i in labelled] == [sample.input_ids[i] for i in labelled]
        question = next(q for q in answers if q in tokenizer.decode(sample.input_ids[: labelled[0]]))
        reference = _expected_trained_text(tokenizer, question, answers[question])
        # the template ends the turn with "<|im_end|>\n": the end-of-turn token is trained, the newline is not
        assert reference == answers[question] + "<|im_end|>\n"
        trained = [sample.input_ids[i] for i in labelled]
        assert trained == tokenizer(answers[question], add_special_tokens=False)["input_ids"] + [im_end]
        assert tokenizer.decode(sample.input_ids[labelled[-1] + 1 :]) == "\n"
    result = train(cfg, show_progress=False)
    assert result.steps == 3 and len(result.losses) == 3
    assert all(math.isfinite(x) and x > 0 for x in result.losses)


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca"])
def test_synth_output_trains_as_it_is(fmt: str, model_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    data = _synth(tmp_path, fmt)
    _train_and_check(model_dir, data, tmp_path / "run", tokenizer, ANSWERS)


@pytest.mark.parametrize("source", ["inline", "field"])
def test_reasoning_kept_trains_with_data_reasoning_keep_and_strip(
    source: str, model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    data = _synth(tmp_path, "openai", "keep", CleanStub(source))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    with_reasoning = {q: f"<think>\n{reasoning_for(q)}\n</think>\n\n{a}" for q, a in ANSWERS.items()}
    assert {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows} == with_reasoning
    # data.reasoning: keep trains the reasoning and the answer, strip only the answer
    _train_and_check(model_dir, data, tmp_path / "keep", tokenizer, with_reasoning, reasoning="keep")
    _train_and_check(model_dir, data, tmp_path / "strip", tokenizer, ANSWERS, reasoning="strip")


def test_reasoning_strip_writes_answers_only_and_refuses_missing_reasoning(tmp_path: Path) -> None:
    data = _synth(tmp_path, "alpaca", "strip", CleanStub("inline"))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert {r["instruction"]: r["output"] for r in rows} == ANSWERS
    # asked for reasoning, the model gives none: the answers are refused (and asked again), not kept bare
    doc = tmp_path / "manual.md"
    cfg = SynthConfig.model_validate(
        {
            "endpoint": "http://stub/v1",
            "questions_per_chunk": 2,
            "reasoning": "keep",
            "parse_retries": 1,
            "backoff_s": 0,
            "cache_dir": str(tmp_path / "cache2"),
        }
    )
    s = synthesize([str(doc)], tmp_path / "none.jsonl", cfg, transport=httpx.MockTransport(CleanStub()))
    assert s.rows_kept == 0 and s.requests == 2 + 4 * 2
    assert {x["reason"] for x in s.skipped} == {"no reasoning block (<think>...</think>) before the answer"}
