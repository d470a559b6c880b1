"""Rows that used to crash a build (deep nesting, lone surrogates, a template or tokenizer that
raises) are bad rows like any other: reported at their line, skipped under `on_error: skip`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunesmith.cli.main import main
from tunesmith.config.schema import DataConfig
from tunesmith.data.batch_tokenize import TokenizeSettings, tokenize_all, tokenize_chunk
from tunesmith.data.build import build_data
from tunesmith.data.conversation import Conversation, Message, RowRef, TextSample
from tunesmith.data.errors import DataError
from tunesmith.data.formats import RowError, to_sample
from tunesmith.data.limits import MAX_DEPTH
from tunesmith.data.stream_build import build_streaming
from tunesmith.data.validate import BadRowError, read_samples

DEEP = 100_000
BOOM_TEMPLATE = (
    "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ 1 // 0 }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def chat(i: int, answer: str | None = None) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": answer or f"Answer {i}."},
        ]
    }


def deep_row(depth: int = DEEP) -> str:
    return '{"messages": ' + "[" * depth + "]" * depth + "}"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def data_config(path: Path, **options: Any) -> DataConfig:
    return DataConfig(train=[{"path": str(path)}], seq_len=128, cache=False, shuffle=False, **options)


# --- deep nesting -------------------------------------------------------------------------------


def test_data_check_reports_a_deeply_nested_row_in_jsonl_and_json(tmp_path, capsys):
    good = json.dumps(chat(1))
    jsonl = write_jsonl(tmp_path / "deep.jsonl", [good, deep_row(), good])
    array = tmp_path / "deep.json"
    array.write_text("[\n" + good + ",\n" + deep_row() + ",\n" + good + "\n]\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    cfg = {"model": "default", "data": {"train": [{"path": str(jsonl)}, {"path": str(array)}]}}
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    assert main(["data", "check", str(config)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{jsonl}:2: nested too deeply: more than {MAX_DEPTH} levels of arrays and objects"
    assert lines[1] == f"{array}:3: nested too deeply: more than {MAX_DEPTH} levels of arrays and objects"
    assert lines[2] == "checked 6 rows in 2 files of 2 sources: 2 problems"


def test_build_skips_a_deep_row_and_keeps_the_good_ones(tmp_path, tokenizer):
    lines = [json.dumps(chat(0)), deep_row(), json.dumps(chat(2)), deep_row(500), json.dumps(chat(4))]
    data = write_jsonl(tmp_path / "deep.jsonl", lines)
    built = build_data(data_config(data, on_error="skip"), tokenizer, "sft")
    assert [s.source.line for s in built.train] == [1, 3, 5]
    assert [(i.ref.line, i.reason[:17]) for i in built.report.skipped] == [
        (2, "nested too deeply"),
        (4, "nested too deeply"),
    ]
    with pytest.raises(BadRowError, match=r"deep\.jsonl:2: nested too deeply"):
        build_data(data_config(data), tokenizer, "sft")


def test_deep_values_inside_strings_and_tools_are_bad_rows():
    ref = RowRef("f.jsonl", 1)
    deep_json = "[" * DEEP + "]" * DEEP
    row = chat(1)
    row["tools"] = deep_json
    with pytest.raises(RowError, match=r"^nested too deeply: more than 100 levels .* \(in tools\)$"):
        to_sample(row, "messages", ref)
    call = {"type": "function", "function": {"name": "f", "arguments": "[" * 300 + "]" * 300}}
    row = {"messages": [chat(1)["messages"][0], {"role": "assistant", "content": None, "tool_calls": [call]}]}
    row["messages"].append({"role": "tool", "content": "ok"})
    row["messages"].append({"role": "assistant", "content": "done"})
    where = r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"
    with pytest.raises(RowError, match=rf"^nested too deeply: .* \(in {where}\)$"):
        to_sample(row, "messages", ref)
    nested: Any = "x"
    for _ in range(MAX_DEPTH):
        nested = {"a": nested}
    with pytest.raises(RowError, match=r"^nested too deeply: .* \(in tools\)"):
        to_sample({**chat(1), "tools": [nested]}, "messages", ref)


# --- lone surrogates ----------------------------------------------------------------------------


def test_a_lone_surrogate_is_refused_at_validation_with_its_field(tmp_path):
    bad = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}'
    paired = (
        '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "x"}]}'
    )
    data = write_jsonl(tmp_path / "s.jsonl", [json.dumps(chat(0)), bad, paired])
    result = read_samples(str(data), on_error="skip")
    assert [s.source.line for s in result.samples] == [1, 3]
    assert result.samples[1].messages[0].content == "\U0001f600"
    assert [str(i) for i in result.issues] == [
        f"{data}:2: messages[0].content: lone surrogate \\ud800 at character 4 of the string "
        "(an unpaired \\uD800-\\uDFFF escape is not valid Unicode text)"
    ]
    array = tmp_path / "s.json"
    array.write_text(f"[{json.dumps(chat(0))},\n{bad}]", encoding="utf-8")
    issues = read_samples(str(array), on_error="skip").issues
    assert [(i.ref.line, i.reason[:31]) for i in issues] == [(2, "messages[0].content: lone surro")]


# --- any exception from rendering or tokenizing is the row's ------------------------------------


def _unchecked(i: int, content: str, file: str = "rows.jsonl") -> Conversation:
    """A conversation built without validation, as a bug or a new reader might let through."""
    messages = (Message("user", content), Message("assistant", f"Answer {i}."))
    return Conversation(messages, RowRef(file, i + 1))


def test_tokenizer_errors_are_reported_per_row_in_process(tokenizer):
    samples = [_unchecked(0, "fine"), _unchecked(1, "bad \ud800"), _unchecked(2, "fine too")]
    texts = [TextSample("ok text", RowRef("t.txt", 1)), TextSample("\udcff", RowRef("t.txt", 2))]
    settings = TokenizeSettings(seq_len=64)
    result = tokenize_chunk(samples, tokenizer, tokenizer.chat_template, settings)
    assert [s.source.line for s in result.block.to_samples()] == [1, 3]
    assert [str(i.ref) for i in result.failed] == ["rows.jsonl:2"]
    assert result.failed[0].reason.startswith("cannot tokenize: TypeError: ")
    text_result = tokenize_chunk(texts, tokenizer, None, TokenizeSettings(seq_len=64, method="pretrain"))
    assert [str(i.ref) for i in text_result.failed] == ["t.txt:2"]
    assert [s.source.line for s in text_result.block.to_samples()] == [1]


def test_tokenizer_errors_are_reported_per_row_in_worker_processes(tokenizer):
    bad_lines = {7, 500, 1199}
    samples = [_unchecked(i, "x \ud800" if i + 1 in bad_lines else f"q {i}") for i in range(1200)]
    settings = TokenizeSettings(seq_len=64)
    parallel = tokenize_all(samples, tokenizer, BOOM_TEMPLATE, settings, num_proc=2)
    assert sorted(i.ref.line for i in parallel.failed) == sorted(bad_lines)
    assert all(i.reason.startswith("cannot tokenize: TypeError") for i in parallel.failed)
    kept = parallel.block.to_samples()
    assert [s.source.line for s in kept] == [n for n in range(1, 1201) if n not in bad_lines]
    single = tokenize_chunk(samples, tokenizer, BOOM_TEMPLATE, settings)
    assert [s.input_ids for s in single.block.to_samples()] == [s.input_ids for s in kept]


def _boom_file(tmp_path: Path) -> tuple[Path, Path]:
    template = tmp_path / "boom.jinja"
    template.write_text(BOOM_TEMPLATE, encoding="utf-8")
    lines = [json.dumps(chat(i, "BOOM" if i in (2, 5) else None)) for i in range(8)]
    return write_jsonl(tmp_path / "boom.jsonl", lines), template


def test_a_template_that_raises_skips_its_row_or_names_it(tmp_path, tokenizer):
    data, template = _boom_file(tmp_path)
    built = build_data(data_config(data, on_error="skip", template=str(template)), tokenizer, "sft")
    assert [s.source.line for s in built.train] == [1, 2, 4, 5, 7, 8]
    assert [str(i) for i in built.report.skipped] == [
        f"{data}:3: chat template: ZeroDivisionError: integer division or modulo by zero",
        f"{data}:6: chat template: ZeroDivisionError: integer division or modulo by zero",
    ]
    with pytest.raises(BadRowError, match=rf"^{data}:3: chat template: ZeroDivisionError") as info:
        build_data(data_config(data, template=str(template)), tokenizer, "sft")
    assert "set data.on_error: skip" in str(info.value)


# --- streaming ----------------------------------------------------------------------------------


def _stream(cfg: DataConfig, tokenizer: Any) -> Any:
    rows, _, report = build_streaming(cfg, tokenizer, "sft", seed=0)
    return rows, report


def test_streaming_reports_rows_rejected_in_later_blocks(tmp_path, tokenizer, caplog):
    data, template = _boom_file(tmp_path)
    with data.open("a", encoding="utf-8") as handle:  # block 3 (rows 9-12): a deep row, a broken one
        handle.write(json.dumps(chat(8)) + "\n" + deep_row() + "\n{broken\n" + json.dumps(chat(11)) + "\n")
    cfg = data_config(data, on_error="skip", template=str(template), streaming=True, stream_block_rows=4)
    with caplog.at_level(logging.WARNING, logger="tunesmith.data.streaming"):
        rows, report = _stream(cfg, tokenizer)
        assert [i.ref.line for i in report.skipped] == [3]  # only the first block is read yet
        lines = [s.source.line for _ in range(12) for s in rows.next_row()]  # two passes
    assert sorted(set(lines)) == [1, 2, 4, 5, 7, 8, 9, 12]
    assert report.rows_read == 12
    assert [(i.ref.line, i.reason[:20]) for i in report.skipped] == [
        (3, "chat template: ZeroD"),
        (6, "chat template: ZeroD"),
        (10, "nested too deeply: m"),
        (11, "invalid JSON: Expect"),
    ]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"skipped {i}" for i in report.skipped]  # each once, not again on pass two


def test_streaming_raise_names_the_row_that_fails_in_a_later_block(tmp_path, tokenizer):
    data, template = _boom_file(tmp_path)
    cfg = data_config(data, template=str(template), streaming=True, stream_block_rows=2)
    rows, _ = _stream(cfg, tokenizer)  # block 1 (rows 1-2) is fine
    with pytest.raises(BadRowError, match=rf"^{data}:3: chat template: ZeroDivisionError"):
        for _ in range(4):
            rows.next_row()


def test_streaming_stops_once_too_many_rows_are_dropped(tmp_path, tokenizer):
    lines = [json.dumps(chat(i)) for i in range(4)] + ["[1]"] * 8
    data = write_jsonl(tmp_path / "bad_tail.jsonl", lines)
    cfg = data_config(data, on_error="skip", streaming=True, stream_block_rows=4, max_dropped_fraction=0.5)
    rows, report = _stream(cfg, tokenizer)
    with pytest.raises(DataError, match=r"^8 of 12 rows streamed so far were skipped or dropped, more than "):
        for _ in range(8):
            rows.next_row()
    assert report.rows_read == 12 and len(report.skipped) == 8
    assert str(report.skipped[0]) == f"{data}:5: row is an array, expected a JSON object"
