"""Reading files row by row (every row located by file and line) and `read_samples`/`check_files`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data import sources
from tunesmith.data.conversation import Conversation, RowRef, TextSample
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.sources import iter_rows, resolve_files
from tunesmith.data.validate import BadRowError, check_files, iter_samples, read_samples


def _rows(path: Path | str, label: str = "data.train[0]") -> list[tuple[int, Any]]:
    """(line, row dict or issue reason) for each row, asserting every ref names the file."""
    out = []
    for ref, row in iter_rows(str(path), label):
        assert isinstance(ref, RowRef)
        out.append((ref.line, row.reason if isinstance(row, RowIssue) else row))
    return out


def _chat(q: str, a: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# --- jsonl --------------------------------------------------------------------------------------


def test_jsonl_rows_keep_physical_lines_and_report_bad_ones(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b'\xef\xbb\xbf{"text": "a"}\r\n'  # BOM and CRLF are fine
        b"\n"
        b"   \n"
        b'{"text": "b\xff"}\n'
        b'{"text": "trunc\n'
        b"[1, 2]\n"
        b'"str"\n'
        b'{"text": "c"} {"text": "d"}\n'
        b'{"text": "last"}'  # no final newline
    )
    assert _rows(f) == [
        (1, {"text": "a"}),
        (4, "invalid UTF-8: byte 0xff at column 12"),
        (5, "invalid JSON: Unterminated string starting at column 10 (line truncated?)"),
        (6, "row is an array, expected a JSON object"),
        (7, "row is a string, expected a JSON object"),
        (8, "invalid JSON: Extra data at column 15"),
        (9, {"text": "last"}),
    ]


# --- json array ---------------------------------------------------------------------------------


def test_json_array_items_are_located_by_their_first_line(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_bytes(
        b'[\n  {"text": "a"},\n  {\n    "text": "b"\n  }, 7,\n  {"text": "bad \xfe"},\n  {"text": "e"}\n]\n'
    )
    assert _rows(f) == [
        (2, {"text": "a"}),
        (3, {"text": "b"}),
        (5, "item 3 is a number, expected a JSON object"),
        (6, "invalid UTF-8: byte 0xfe"),
        (7, {"text": "e"}),
    ]


def test_json_array_broken_midway_reports_where_and_keeps_earlier_items(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text('[{"text": "a"},\n {"text": "b",\n  "x": }, {"text": "c"}]')
    assert _rows(f) == [
        (1, {"text": "a"}),
        (2, "invalid JSON in item 2: Expecting value at line 3 column 8 (rest of the file not read)"),
    ]


def test_json_array_truncated_or_with_trailing_data(tmp_path: Path) -> None:
    f = tmp_path / "t.json"
    f.write_text('[{"text": "a"},\n{"text": "b"}\n')
    assert _rows(f)[-1] == (3, "invalid JSON: expected ',' or ']' after item 2, found end of file")
    f.write_text('[{"text": "a"}]\n\n{"text": "b"}')
    assert _rows(f) == [
        (1, {"text": "a"}),
        (3, "invalid JSON: unexpected data after the closing ']' (not read)"),
    ]
    f.write_text("  [ ]  ")
    assert _rows(f) == []


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert _rows(f) == [(1, {"text": "a"}), (3, {"text": "b"})]


# --- csv ----------------------------------------------------------------------------------------


def test_csv_records_start_lines_count_the_header_and_multiline_fields(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    big = "z" * 200_000  # over csv's default 128 KiB field limit
    f.write_bytes(
        b"\xef\xbb\xbfinstruction,input,output\r\n"
        b'"two\r\nlines",,a\r\n'
        b"\r\n"
        b"short,row\r\n"
        b"too,many,fields,here\r\n"
        b"bad,\xff,x\r\n" + f"big,,{big}\r\n".encode() + b'q,"multi\nline\ninput",o'
    )
    assert _rows(f) == [
        (2, {"instruction": "two\r\nlines", "input": "", "output": "a"}),
        (5, "CSV row has 2 fields but the header has 3 (missing: output)"),
        (6, "CSV row has 4 fields but the header has 3"),
        (7, "invalid UTF-8: byte 0xff in column 'input'"),
        (8, {"instruction": "big", "input": "", "output": big}),
        (9, {"instruction": "q", "input": "multi\nline\ninput", "output": "o"}),
    ]


def test_csv_with_unusable_header(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("text,text\nx,y\n")
    assert _rows(f) == [(1, "duplicate CSV column 'text' in the header (file not read)")]
    f.write_bytes(b"te\xffxt\nx\n")
    assert _rows(f) == [(1, "invalid UTF-8 in the CSV header (file not read)")]
    f.write_text("")
    assert _rows(f) == []


# --- parquet ------------------------------------------------------------------------------------


def test_parquet_rows_are_numbered_as_rows(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    rows = [_chat(f"q{i}", f"a{i}") for i in range(2500)]  # more than one read batch
    pq.write_table(pa.Table.from_pylist(rows), f)
    got = list(iter_rows(str(f), "x"))
    assert [ref.line for ref, _ in got] == list(range(1, 2501))
    assert got[1799][1] == rows[1799]
    assert str(got[0][0]) == f"{f}:row 1"


def test_unreadable_parquet_is_an_issue_not_a_crash(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    f.write_bytes(b"not parquet at all")
    [(ref, issue)] = list(iter_rows(str(f), "x"))
    assert ref == RowRef(str(f), 1, "row")
    assert isinstance(issue, RowIssue)
    assert issue.reason.startswith("cannot read parquet:")
    assert issue.reason.endswith("(rest of the file not read)")


# --- txt ----------------------------------------------------------------------------------------


def test_small_txt_is_one_sample(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    f.write_text("Para one.\n\nPara two.\n")
    assert _rows(f) == [(1, {"text": "Para one.\n\nPara two.\n"})]
    f.write_bytes(b"ok\n\nbad \xc3(\n")
    assert _rows(f) == [(1, "invalid UTF-8: byte 0xc3 at line 3")]
    f.write_text(" \n\n")
    assert _rows(f) == []


def test_large_txt_is_split_into_paragraphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "TXT_SPLIT_BYTES", 10)
    f = tmp_path / "book.txt"
    f.write_bytes(b"\n\nFirst para\nstill first\n\n\n  \nSecond \xff\n\nThird\r\n")
    assert _rows(f) == [
        (3, {"text": "First para\nstill first"}),
        (8, "invalid UTF-8: byte 0xff at line 8"),
        (10, {"text": "Third"}),
    ]


# --- paths --------------------------------------------------------------------------------------


def test_missing_file_and_unsupported_type_raise_with_the_label(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        iter_rows("nope/x.jsonl", "data.train[2]")
    assert str(info.value) == "data.train[2].path: file not found: nope/x.jsonl"
    (tmp_path / "d.xlsx").write_text("")
    with pytest.raises(
        DataError, match=r'^data.train\[0\].path: unsupported file type ".xlsx": .*d.xlsx \(supported: .jsonl'
    ):
        resolve_files(str(tmp_path / "d.xlsx"), "data.train[0]")


def test_directory_reads_supported_files_sorted_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('[{"text": "c"}]')
    (tmp_path / "README.md").write_text("# not data")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "h"}\n')
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.jsonl").write_text('{"text": "g"}\n')
    got = [(Path(ref.file).name, row["text"]) for ref, row in iter_rows(str(tmp_path), "x")]
    assert got == [("a.txt", "a"), ("b.jsonl", "b"), ("c.json", "c")]


def test_glob_and_empty_matches(tmp_path: Path) -> None:
    for name in ("p2.jsonl", "p1.jsonl", "q.jsonl", "p3.md"):
        (tmp_path / name).write_text(json.dumps({"text": name}) + "\n")
    files = resolve_files(str(tmp_path / "p*"), "x")
    assert [f.name for f in files] == ["p1.jsonl", "p2.jsonl"]
    with pytest.raises(DataError, match=r"^x.path: no files match .*zz\*"):
        resolve_files(str(tmp_path / "zz*"), "x")
    with pytest.raises(DataError, match=r"^x.path: no supported data files match .*p3\*"):
        resolve_files(str(tmp_path / "p3*"), "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files in directory"):
        resolve_files(str(tmp_path / "empty"), "x")


# --- read_samples / check_files -----------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_read_samples_raise_names_the_first_bad_row_and_the_hint(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [_chat("q", "a"), _chat("q", ""), "{broken"])
    with pytest.raises(BadRowError) as info:
        read_samples(str(f))
    assert str(info.value) == (
        f"{f}:2: messages[1].content: empty assistant message\nhint: set data.on_error: skip to skip bad rows"
    )
    assert info.value.issue.ref == RowRef(str(f), 2)
    assert isinstance(info.value, DataError)


def test_read_samples_skip_keeps_good_rows_in_order(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [_chat("q1", "a1"), "{broken", _chat("q2", "a2"), {"text": "t"}, _chat("q3", "a3")])
    result = read_samples(str(f), on_error="skip")
    assert [s.messages[0].content for s in result.samples] == ["q1", "q2", "q3"]  # type: ignore[union-attr]
    assert [s.source.line for s in result.samples] == [1, 3, 5]
    assert [(i.ref.line, i.reason.split(":")[0]) for i in result.issues] == [
        (2, "invalid JSON"),
        (4, 'missing key "messages"'),
    ]
    assert result.rows_read == 5
    assert result.formats == {str(f): "messages"}


def test_auto_detects_after_leading_bad_rows_and_judges_them_by_that_format(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"instruction": "no output"}, "[]", {"instruction": "i", "output": "o"}])
    result = read_samples(str(f), on_error="skip")
    assert [(i.ref.line, i.reason) for i in result.issues] == [
        (1, 'missing key "output"'),
        (2, "row is an array, expected a JSON object"),
    ]
    assert len(result.samples) == 1
    assert isinstance(result.samples[0], Conversation)


def test_auto_detection_is_per_file(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}])
    _write_jsonl(
        tmp_path / "b.jsonl",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    result = read_samples(str(tmp_path))
    assert isinstance(result.samples[0], TextSample)
    assert isinstance(result.samples[1], Conversation)
    assert list(result.formats.values()) == ["text", "sharegpt"]


def test_undetectable_file_raises_even_when_skipping(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, ["{bad", {"prompt": "p", "completion": "c"}, {"question": "q"}])
    with pytest.raises(DataError) as info:
        read_samples(str(f), on_error="skip", label="data.train[1]")
    msg = str(info.value)
    assert msg.startswith(f"data.train[1]: cannot detect the data format of {f}")
    assert f"(first row, {f}:2, has keys: 'prompt', 'completion')" in msg
    assert "messages: messages; sharegpt: conversations; alpaca: instruction + output; text: text" in msg
    assert msg.endswith("or set data.train[1].format")


def test_file_with_no_readable_rows_reports_them(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, ["{bad", "[1]"])
    result = read_samples(str(f), on_error="skip")
    assert [i.ref.line for i in result.issues] == [1, 2]
    assert result.samples == [] and result.rows_read == 2


def test_explicit_format_skips_detection(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"text": "t", "messages": "ignored"}])
    assert read_samples(str(f), fmt="text").samples == [TextSample("t", RowRef(str(f), 1))]
    with pytest.raises(DataError, match=r"^data.train\[0\].format: unknown format 'chatml'"):
        read_samples(str(f), fmt="chatml")
    with pytest.raises(ValueError, match="on_error"):
        read_samples(str(f), on_error="ignore")  # type: ignore[arg-type]


def test_iter_samples_streams_and_raises_path_errors_at_call(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        iter_samples(str(tmp_path / "none.jsonl"))
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"text": "a"}, {"text": ""}])
    got = list(iter_samples(str(f)))
    assert got[0] == (RowRef(str(f), 1), TextSample("a", RowRef(str(f), 1)))
    assert got[1] == (RowRef(str(f), 2), RowIssue(RowRef(str(f), 2), "text: empty"))


def test_check_files_collects_issues_of_every_source(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    _write_jsonl(a, [{"text": "x"}, {"text": 3}])
    b.write_text("instruction,output\nq,a\nq\n")
    issues = check_files([str(a), str(b)])
    assert [str(i) for i in issues] == [
        f"{a}:2: text: expected a string, got a number",
        f"{b}:3: CSV row has 1 fields but the header has 2 (missing: output)",
    ]
    with pytest.raises(DataError, match=r"^data.train\[1\].path: file not found"):
        check_files([str(a), str(tmp_path / "gone.csv")])
