"""`tunesmith runs`: statuses and figures of real tiny runs, read back against their own metrics.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import base_config, write_chat_jsonl
from tunesmith.cli.main import main
from tunesmith.config.load import load_config
from tunesmith.runs.compare import compare_runs, config_diff
from tunesmith.runs.overview import find_runs, format_table, overview
from tunesmith.training.loop import TrainingDiverged, train
from tunesmith.training.methods.base import LossOutput
from tunesmith.training.methods.sft import SFT
from tunesmith.training.run_dir import (
    DEAD_RUN_REASON,
    STATUS_FILE,
    RunDirError,
    RunLock,
    failure_reason,
    mark_ended,
    mark_running,
    read_status,
)

ROWS = [(f"Question {i}: what is {i} times two?", f"{i} times two is {2 * i}.") for i in range(8)]


def _cfg(model_dir: Path, data: Path, eval_data: Path, out: Path, lr: float) -> object:
    raw = base_config(model_dir, data, out, train={"epochs": 2, "lr": lr, "eval_every": 1, "save_every": 2})
    raw["data"]["eval"] = [{"path": str(eval_data)}]
    return load_config(raw)


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory) -> Path:
    """runs/{done, stopped, failed, crashed}: finished, interrupted, diverged, and `running` with a dead pid."""
    root = tmp_path_factory.mktemp("runs")
    data = write_chat_jsonl(root / "train.jsonl", ROWS)
    eval_data = write_chat_jsonl(root / "eval.jsonl", ROWS[:3])
    model = tiny_model_dirs["llama"]
    train(_cfg(model, data, eval_data, root / "runs" / "done", 1e-2), show_progress=False)
    train(
        _cfg(model, data, eval_data, root / "runs" / "stopped", 5e-3), show_progress=False, stop_after_step=2
    )
    original, calls = SFT.compute_loss, {"n": 0}

    def poisoned(self, model, batch):
        out = original(self, model, batch)
        if not model.training:  # evaluation batches
            return out
        calls["n"] += 1
        return LossOutput(out.loss_sum * torch.tensor(float("nan")), out.count) if calls["n"] == 3 else out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SFT, "compute_loss", poisoned)
        with pytest.raises(TrainingDiverged):
            train(_cfg(model, data, eval_data, root / "runs" / "failed", 1e-2), show_progress=False)
    crashed = root / "runs" / "group" / "crashed"  # one level deeper: found too
    train(_cfg(model, data, eval_data, crashed, 1e-2), show_progress=False, stop_after_step=1)
    status = json.loads((crashed / STATUS_FILE).read_text())
    status.update(status="running", pid=_dead_pid(), host=socket.gethostname())
    status.pop("ended"), status.pop("duration_s")
    (crashed / STATUS_FILE).write_text(json.dumps(status))
    return root / "runs"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_statuses_and_figures_equal_the_runs_files(runs):
    by_name = {Path(s.path).name: s for s in overview(runs)}
    assert set(by_name) == {"done", "stopped", "failed", "crashed"}
    assert {name: s.status for name, s in by_name.items()} == {
        "done": "finished",
        "stopped": "interrupted",
        "failed": "failed",
        "crashed": "failed",
    }
    assert "step 3" in by_name["failed"].reason and "loss is nan" in by_name["failed"].reason
    assert by_name["crashed"].reason == DEAD_RUN_REASON
    assert by_name["stopped"].reason.startswith("stopped at step 2")
    assert by_name["done"].reason is None
    for name in ("done", "stopped"):
        rows = _metrics(runs / name)
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        summary = by_name[name]
        assert summary.steps == max(r["step"] for r in rows)
        assert summary.last_eval_loss == evals[-1]
        assert summary.best_eval_loss == min(evals)
        assert summary.tokens_per_s == [r for r in rows if "loss" in r][-1]["tokens_per_s"]
        assert (summary.method, summary.adapter) == ("sft", "lora r16")
    assert by_name["stopped"].steps == 2 and by_name["done"].steps == 8
    table = format_table(overview(runs), runs)
    assert f"{by_name['done'].best_eval_loss:.4f}" in table
    assert "failed: process ended without a status; killed?" in table


def test_runs_cli_json(runs, capsys):
    assert main(["runs", str(runs), "--json"]) == 0
    listed = {Path(row["path"]).name: row for row in json.loads(capsys.readouterr().out)}
    assert listed["done"]["status"] == "finished" and listed["failed"]["status"] == "failed"
    assert main(["runs", str(runs), "--depth", "1", "--json"]) == 0
    assert "crashed" not in {Path(row["path"]).name for row in json.loads(capsys.readouterr().out)}


def test_compare_plots_both_curves_and_names_the_changed_key(runs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    result = compare_runs([runs / "done", runs / "stopped"], png)
    drawn = {line.label: list(zip(line.steps, line.values, strict=True)) for line in result.lines}
    for name in ("done", "stopped"):
        rows = _metrics(runs / name)
        assert drawn[f"{name} train"] == [(r["step"], r["loss"]) for r in rows if "loss" in r]
        assert drawn[f"{name} eval"] == [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.differing == {"train.lr": {"done": 0.01, "stopped": 0.005}}
    assert (
        main(["runs", "compare", str(runs / "done"), str(runs / "stopped"), "--out", str(png), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["config_diff"] == {
        "train.lr": {"done": 0.01, "stopped": 0.005}
    }


def test_config_diff_counts_a_missing_key_as_a_difference():
    diff = config_diff([{"a": {"b": 1}, "c": 2}, {"a": {"b": 1}}], ["x", "y"])
    assert diff == {"c": {"x": 2, "y": "<unset>"}}


def test_a_refused_run_leaves_the_existing_status_alone(runs, tiny_model_dirs, tmp_path):
    before = (runs / "done" / STATUS_FILE).read_text()
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = load_config(base_config(tiny_model_dirs["llama"], data, runs / "done", train={"max_steps": 1}))
    with pytest.raises(RunDirError):
        train(cfg, show_progress=False)
    assert (runs / "done" / STATUS_FILE).read_text() == before


def test_running_reads_as_running_only_while_its_process_holds_the_run(tmp_path):
    (tmp_path / "config.yaml").write_text("model: x\n")
    mark_running(tmp_path)
    assert read_status(tmp_path)["status"] == "running"  # this process
    status = json.loads((tmp_path / STATUS_FILE).read_text())
    (tmp_path / STATUS_FILE).write_text(json.dumps({**status, "host": "elsewhere"}))
    assert read_status(tmp_path)["status"] == "failed"  # another host, and nobody holds the lock
    with RunLock(tmp_path):
        assert read_status(tmp_path)["status"] == "running"
    assert not mark_ended(tmp_path, "finished")  # not this process's run any more: left as it is
    assert find_runs(tmp_path) == [tmp_path]


def test_failure_reason_is_one_line():
    assert failure_reason(RuntimeError("CUDA out of memory.\nTried to allocate")) == (
        "out of memory: CUDA out of memory."
    )
    assert failure_reason(TrainingDiverged("step 4: loss is nan")) == "step 4: loss is nan"
    assert failure_reason(KeyError("text")) == "KeyError: 'text'"
    assert os.linesep not in failure_reason(ValueError("a\nb"))
