"""`tunesmith eval`: results.json holds the numbers a direct call computes; --compare adds the CI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tunesmith.cli.main import main
from tunesmith.config.schema import EvalTask

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "eval"
PPL = str(EXAMPLES / "ppl_chat.jsonl")
GEN = str(EXAMPLES / "gen_arith.jsonl")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer_dir):
    from conftest import make_tiny_model_dir

    root = tmp_path_factory.mktemp("eval-models")
    return (
        make_tiny_model_dir("llama", root / "a", tokenizer_dir, seed=0),
        make_tiny_model_dir("llama", root / "b", tokenizer_dir, seed=1),
    )


def _direct(model_dir: Path, tasks: list[EvalTask]) -> list:
    from tunesmith.eval.tasks import evaluate_model

    return evaluate_model(str(model_dir), tasks)


def test_results_json_equals_a_direct_call(two_models, tmp_path, capsys):
    a, _ = two_models
    out = tmp_path / "results.json"
    code = main(
        [
            "eval",
            str(a),
            "--task",
            f"perplexity:{PPL}",
            "--task",
            f"gen:{GEN}",
            "--match",
            "regex",
            "--max-new-tokens",
            "4",
            "--limit",
            "6",
            "--out",
            str(out),
            "--log-samples",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    tasks = [
        EvalTask(kind="perplexity", path=PPL, limit=6, match="regex", max_new_tokens=4),
        EvalTask(kind="gen", path=GEN, limit=6, match="regex", max_new_tokens=4),
    ]
    direct = _direct(a, tasks)
    assert [r["task"] for r in data["results"]] == [f"perplexity:{PPL}", f"gen:{GEN}"]
    for got, want in zip(data["results"], direct, strict=True):
        assert got["n"] == want.n == 6
        assert got["metrics"] == pytest.approx(want.metrics, abs=1e-9)
        assert len(got["samples"]) == 6
    assert set(data["results"][1]["samples"][0]) >= {
        "prompt",
        "generated",
        "prediction",
        "answer",
        "exact_match",
    }
    printed = capsys.readouterr().out
    assert "nll" in printed and "exact_match" in printed and f"{direct[0].metrics['nll']:.4f}" in printed


def test_compare_writes_both_models_and_the_bootstrap_interval(two_models, tmp_path, capsys):
    from tunesmith.eval.compare import paired_bootstrap

    a, b = two_models
    out = tmp_path / "cmp.json"
    assert main(["eval", str(a), "--task", f"perplexity:{PPL}", "--compare", str(b), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == str(a) and data["compare"]["model"] == str(b)
    task = EvalTask(kind="perplexity", path=PPL)
    (ra,), (rb,) = _direct(a, [task]), _direct(b, [task])
    assert data["compare"]["results"][0]["metrics"] == pytest.approx(rb.metrics, abs=1e-9)
    got = {d["metric"]: d for d in data["compare"]["differences"][0]["differences"]}
    want = {d.metric: d for d in paired_bootstrap(ra, rb)}
    for metric in ("nll", "ppl", "token_acc"):
        assert got[metric]["diff"] == pytest.approx(rb.metrics[metric] - ra.metrics[metric])
        assert (got[metric]["low"], got[metric]["high"]) == pytest.approx(
            (want[metric].low, want[metric].high)
        )
    assert "95% CI" in capsys.readouterr().out


def test_mc_task_runs_through_the_cli(two_models, tmp_path):
    pytest.importorskip("tunesmith.eval.mc")
    mc = EXAMPLES / "mc_science.jsonl"
    if not mc.is_file():
        pytest.skip("no example mc task file")
    a, _ = two_models
    out = tmp_path / "mc.json"
    assert main(["eval", str(a), "--task", f"mc:{mc}", "--limit", "4", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    (direct,) = _direct(a, [EvalTask(kind="mc", path=str(mc), limit=4)])
    assert result["metrics"] == pytest.approx(direct.metrics)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "at least one --task"),
        (["--task", "ppl:x.jsonl"], "--task ppl:x.jsonl"),
        (["--task", "gen:x.jsonl", "--limit", "0"], "limit"),
        (["--task", f"gen:{GEN}", "--match", "callable", "--function", "nowhere_xyz:f"], "cannot import"),
        (["--harness-include", "dir", "--task", f"gen:{GEN}"], "use it with --harness"),
    ],
)
def test_user_errors_are_one_line(two_models, argv, message, capsys):
    assert main(["eval", str(two_models[0]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_harness_tasks_are_run_and_written(two_models, tmp_path, monkeypatch):
    """--harness hands the task names and flags to the lm-eval bridge; its results join the others."""
    from tunesmith.eval import harness
    from tunesmith.eval.results import TaskResult

    calls = []

    def fake(spec, tasks, *, limit=None, shots=None, log_samples=False, include_path=None):
        calls.append((spec, tasks, limit, shots, log_samples, include_path))
        return [TaskResult(f"harness:{t}", 3, {"acc": 0.5 + i / 10}) for i, t in enumerate(tasks)]

    monkeypatch.setattr(harness, "run_harness", fake)
    a, _ = two_models
    out = tmp_path / "h.json"
    argv = ["eval", str(a), "--harness", "arc_easy, mine", "--harness-include", "yamls", "--shots", "2"]
    assert main([*argv, "--limit", "3", "--out", str(out)]) == 0
    assert calls == [(str(a), ["arc_easy", "mine"], 3, 2, False, "yamls")]
    results = json.loads(out.read_text())["results"]
    assert [(r["task"], r["metrics"]["acc"]) for r in results] == [
        ("harness:arc_easy", 0.5),
        ("harness:mine", 0.6),
    ]


def test_run_task_scores_in_eval_mode_and_restores_the_mode(two_models):
    """During training the model is in train mode: dropout off for the task, train mode again after."""
    from tunesmith.eval.perplexity import evaluate_perplexity
    from tunesmith.eval.tasks import run_task
    from tunesmith.models.load import load_model, load_tokenizer

    model, tokenizer = load_model(two_models[0]), load_tokenizer(two_models[0])
    model.config.attention_dropout = 0.5
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    task = EvalTask(kind="perplexity", path=PPL, limit=3)
    model.train()
    got = run_task(model, tokenizer, task)
    assert all(m.training for m in model.modules())
    model.eval()
    assert got.metrics == evaluate_perplexity(model, tokenizer, task).metrics


def test_dev_flag_names_the_shots_file():
    from tunesmith.cli.eval_cmd import add_eval_parser, build_tasks

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "default", "--task", "mc:test.csv", "--dev", "dev.csv", "--shots", "5"])
    (task,) = build_tasks(args)
    assert (task.path, task.dev_path, task.shots) == ("test.csv", "dev.csv", 5)
