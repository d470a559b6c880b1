"""`eval.tasks` scored during training: the logged numbers are those of the model at that step."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import base_config, make_tiny_model_dir
from tunesmith.config.load import load_config
from tunesmith.config.schema import EvalTask
from tunesmith.eval.tasks import run_task
from tunesmith.infer.loading import load_for_inference
from tunesmith.training.loop import train
from tunesmith.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
MC = str(REPO / "examples" / "eval" / "mc_science.jsonl")


def _chat_rows(path: Path, count: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Name the number {i}."},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tasks_run_at_the_cadence_and_the_end_and_match_the_saved_model(tmp_path, tokenizer_dir):
    model_dir = make_tiny_model_dir("llama", tmp_path / "model", tokenizer_dir)
    data = _chat_rows(tmp_path / "train.jsonl", 12)
    held_out = _chat_rows(tmp_path / "held.jsonl", 4)
    cfg = load_config(
        base_config(
            model_dir,
            data,
            tmp_path / "run",
            train={"max_steps": 4, "eval_every": 2},
            eval={"tasks": [f"mc:{MC}", {"kind": "perplexity", "path": str(held_out), "limit": 4}]},
        )
    )
    train(cfg, show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/mc_science/acc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert "eval_loss" not in rows[0]  # no eval data: the tasks alone
    model, tokenizer = load_for_inference(str(tmp_path / "run"))
    mc = run_task(model, tokenizer, EvalTask.model_validate(f"mc:{MC}"))
    ppl = run_task(model, tokenizer, EvalTask(kind="perplexity", path=str(held_out), limit=4))
    last = rows[-1]
    assert last["eval/mc_science/acc"] == mc.metrics["acc"]
    assert abs(last["eval/held/nll"] - ppl.metrics["nll"]) < 1e-5
    assert rows[0]["eval/held/nll"] != last["eval/held/nll"]  # the model moved between the two
