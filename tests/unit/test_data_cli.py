"""`tunesmith data preview` and `tunesmith data check`, run through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import IDENTITY_ROWS, base_config, write_chat_jsonl
from tunesmith.cli.main import main
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_conversation
from tunesmith.data.validate import read_samples


@pytest.fixture
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _config(tmp_path: Path, model_dir: Path, data: Path, **data_options) -> Path:
    cfg = base_config(model_dir, data, tmp_path / "run")
    cfg["data"].update(data_options)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_preview_json_labels_equal_what_tokenize_produces(tmp_path, model_dir, capsys):
    from transformers import AutoTokenizer

    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    config = _config(tmp_path, model_dir, data)
    assert main(["data", "preview", str(config), "data.mask_history=true", "-n", "4", "--json"]) == 0
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert len(records) == 4
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = {str(s.source): s for s in read_samples(str(data)).samples}
    for record in records:
        conv = rows[record["source"]]
        expected = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 128, mask_history=True)
        assert record["input_ids"] == expected.input_ids
        assert record["labels"] == expected.labels
        assert record["text"] == tokenizer.decode(expected.input_ids)
        assert any(label != IGNORE_INDEX for label in record["labels"])
    assert "samples: 8 train, 0 eval" in out.err  # counts go to stderr, so stdout stays JSON Lines


def test_preview_marks_trained_text_and_prints_the_counts(tmp_path, model_dir, capsys):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    config = _config(tmp_path, model_dir, data, packing=True, shuffle=False)
    assert main(["data", "preview", str(config), "-n", "2"]) == 0
    out = capsys.readouterr().out
    question, answer = IDENTITY_ROWS[0]
    assert f"user\n{question}<|im_end|>\n<|im_start|>assistant\n[[{answer}<|im_end|>]]" in out
    assert out.count("[[") == 2 + 1  # two samples, plus the legend
    assert "sample 1 of 8 (" in out
    for line in ("samples: 8 train, 0 eval", "truncated: 0  skipped: 0  dropped: 0  duplicates: 0"):
        assert line in out
    assert "packing fill: " in out and "rows of 128 tokens" in out
    assert "data.train[0] " in out and "8 rows, 8 samples used" in out


def test_preview_colours_trained_text_in_a_terminal(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    assert main(["data", "preview", str(_config(tmp_path, model_dir, data)), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[1;32m" in out and "[[" not in out  # bold green, no brackets
    assert "trained tokens in green" in out


def test_preview_lists_skipped_rows(tmp_path, model_dir, capsys):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    with data.open("a") as handle:
        handle.write('{"messages": []}\n')
    config = _config(tmp_path, model_dir, data, on_error="skip")
    assert main(["data", "preview", str(config), "-n", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1" in out and f"{data}:9: messages: empty array" in out


def test_check_passes_good_data(tmp_path, model_dir, capsys):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    assert main(["data", "check", str(_config(tmp_path, model_dir, data))]) == 0
    assert capsys.readouterr().out.strip() == "checked 8 rows in 1 file of 1 sources: all valid"


def test_check_lists_every_bad_row_and_exits_1(tmp_path, model_dir, capsys):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    with data.open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"instruction": "x", "output": ""}) + "\n")
    config = _config(tmp_path, model_dir, data)
    overrides = [f"data.eval=[{{path: {extra}, format: alpaca}}]"]
    assert main(["data", "check", str(config), *overrides]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{data}:9: invalid JSON")
    assert lines[1] == f"{data}:10: messages: no assistant message (nothing to train on)"
    assert lines[2] == f"{extra}:1: output: empty"
    assert lines[3] == "checked 11 rows in 2 files of 2 sources: 3 problems"


def test_check_reports_a_missing_file_and_exits_1(tmp_path, model_dir, capsys):
    config = _config(tmp_path, model_dir, tmp_path / "missing.jsonl")
    assert main(["data", "check", str(config)]) == 1
    out = capsys.readouterr().out
    assert "data.train[0].path: file not found" in out and "1 problem" in out


def test_a_config_error_is_one_line_and_exit_2(tmp_path, model_dir, capsys):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    config = _config(tmp_path, model_dir, data)
    assert main(["data", "preview", str(config), "data.reasoning=drop"]) == 2
    assert "data.reasoning: expected one of 'keep' or 'strip'" in capsys.readouterr().err
