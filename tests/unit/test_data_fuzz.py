"""Seeded fuzz: a few thousand rows of every format and file type, good and malformed mixed.

The generator records, for every row, either the sample it must become or the file, line and
reason prefix of the issue it must raise. The reader must keep every good row (same content, same
order), report every bad row at exactly that place, never raise in skip mode, and in raise mode
stop at the first bad row.

A second generator feeds hostile rows (deep nesting, lone surrogates, wrong types, huge fields,
bad UTF-8, rows the chat template chokes on) through tokenizing, in memory and streamed: no
crash, every bad row reported at its line, and the good rows' tokens exactly those of a file that
holds only the good rows.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.conversation import Conversation, RowRef, TextSample
from tunesmith.data.validate import BadRowError, read_samples

POOL = "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?\"'\\/\t\n{}[]éßü中文🙂"
BAD = "¤"  # never in POOL: a marker whose UTF-8 bytes are swapped for an invalid byte on disk
HUGE = 10_000_001

Content = tuple[tuple[str, str, float | None], ...] | str


@dataclass
class Expect:
    ref: RowRef
    good: Content | None = None
    reason: str | None = None


@dataclass
class Gen:
    rng: random.Random
    expected: list[Expect] = field(default_factory=list)
    huge_done: set[str] = field(default_factory=set)

    def text(self, lo: int = 1, hi: int = 30) -> str:
        s = "".join(self.rng.choice(POOL) for _ in range(self.rng.randint(lo, hi)))
        return s if s.strip() else s + "x"

    def huge(self, where: str) -> bool:
        """True once per `where`: a 10 MB field is slow to write, one of each kind is enough."""
        if where in self.huge_done:
            return False
        self.huge_done.add(where)
        return True


# --- good and bad rows per format ---------------------------------------------------------------
# Each maker returns (row, content) for a good row or (row, reason prefix) for a bad one.


def good_messages(g: Gen) -> tuple[dict[str, Any], Content]:
    turns: list[dict[str, Any]] = []
    want: list[tuple[str, str, float | None]] = []
    if g.rng.random() < 0.3:
        s = g.text()
        turns.append({"role": "system", "content": s})
        want.append(("system", s, None))
    rounds = g.rng.randint(1, 3)
    for r in range(rounds):
        if g.rng.random() < 0.2:
            a, b = g.text(), g.text()
            turns.append(
                {"role": "user", "content": [{"type": "text", "text": a}, {"type": "text", "text": b}]}
            )
            want.append(("user", a + "\n" + b, None))
        else:
            u = g.text()
            turns.append({"role": "user", "content": u})
            want.append(("user", u, None))
        if g.rng.random() < 0.15:
            call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
            turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
            want.append(("assistant", "", None))
            t = g.text()
            turns.append({"role": "tool", "content": t})
            want.append(("tool", t, None))
        a = g.text()
        weight = g.rng.choice([0, 1]) if r < rounds - 1 and g.rng.random() < 0.3 else None
        turns.append({"role": "assistant", "content": a, **({} if weight is None else {"weight": weight})})
        want.append(("assistant", a, None if weight is None else float(weight)))
    return {"messages": turns}, tuple(want)


def _pick(g: Gen, turns: list[dict[str, Any]], role: str) -> int:
    return g.rng.choice([i for i, t in enumerate(turns) if t["role"] == role])


def bad_messages(g: Gen) -> tuple[dict[str, Any], str]:
    row, _ = good_messages(g)
    turns = row["messages"]
    kind = g.rng.choice(["role", "type", "empty", "two", "none", "system", "weight", "key", "list", "huge"])
    if kind == "huge" and g.huge("messages"):
        i = _pick(g, turns, "assistant")
        turns[i] = {"role": "assistant", "content": "x" * HUGE}
        return row, f"messages[{i}].content: field too long"
    if kind == "role":
        i = g.rng.randrange(len(turns))
        turns[i]["role"] = "bot"
        return row, f'messages[{i}].role: unknown role "bot" (allowed: system, user, assistant, tool)'
    if kind == "type":
        i = g.rng.randrange(len(turns))
        turns[i]["content"] = 42
        return row, f"messages[{i}].content: expected a string or an array of text parts, got a number"
    if kind == "empty":
        i = _pick(g, turns, "user")
        turns[i]["content"] = g.rng.choice(["", "  ", "\n"])
        return row, f"messages[{i}].content: empty user message"
    if kind == "two":
        i = _pick(g, turns, "assistant")
        turns.insert(i + 1, {"role": "assistant", "content": g.text()})
        return (
            row,
            f"messages[{i + 1}]: two assistant messages in a row (messages[{i}] and messages[{i + 1}])",
        )
    if kind == "none":
        row["messages"] = [t for t in turns if t["role"] in ("system", "user")][:2]
        if [t["role"] for t in row["messages"]] == ["user", "user"]:
            row["messages"].pop()
        return row, "messages: no assistant message (nothing to train on)"
    if kind == "system":
        i = g.rng.randint(1, len(turns))
        turns.insert(i, {"role": "system", "content": g.text()})
        return row, f"messages[{i}]: system message must come first"
    if kind == "weight":
        i = _pick(g, turns, "assistant")
        turns[i]["weight"] = 2
        return row, f"messages[{i}].weight: must be 0 or 1, got 2"
    if kind == "list":
        return {"messages": g.text()}, "messages: expected an array, got a string"
    return {"msgs": turns}, 'missing key "messages"'


def good_sharegpt(g: Gen) -> tuple[dict[str, Any], Content]:
    row: dict[str, Any] = {"conversations": []}
    want: list[tuple[str, str, float | None]] = []
    if g.rng.random() < 0.3:
        row["system"] = g.text()
        want.append(("system", row["system"], None))
    for _ in range(g.rng.randint(1, 3)):
        for speaker, role in (
            g.rng.choice([("human", "user"), ("user", "user")]),
            g.rng.choice([("gpt", "assistant"), ("model", "assistant")]),
        ):
            v = g.text()
            row["conversations"].append({"from": speaker, "value": v})
            want.append((role, v, None))
    return row, tuple(want)


def bad_sharegpt(g: Gen) -> tuple[dict[str, Any], str]:
    row, _ = good_sharegpt(g)
    conv = row["conversations"]
    kind = g.rng.choice(["from", "value", "empty", "two", "none", "key"])
    if kind == "from":
        i = g.rng.randrange(len(conv))
        conv[i]["from"] = "bot"
        return row, f'conversations[{i}].from: unknown role "bot"'
    if kind == "value":
        i = g.rng.randrange(len(conv))
        conv[i]["value"] = None
        return row, f"conversations[{i}].value: expected a string, got null"
    if kind == "empty":
        i = g.rng.randrange(1, len(conv), 2)
        conv[i]["value"] = ""
        return row, f"conversations[{i}].value: empty assistant message"
    if kind == "two":
        i = g.rng.randrange(1, len(conv), 2)
        conv.insert(i + 1, {"from": "gpt", "value": g.text()})
        return row, f"conversations[{i + 1}]: two assistant messages in a row"
    if kind == "none":
        row["conversations"] = conv[:1]
        return row, "conversations: no assistant message (nothing to train on)"
    return {"conversation": conv}, 'missing key "conversations"'


def good_alpaca(g: Gen) -> tuple[dict[str, Any], Content]:
    ins, out = g.text(), g.text()
    inp = g.text() if g.rng.random() < 0.5 else ""
    user = ins + "\n\n" + inp if inp else ins
    return {"instruction": ins, "input": inp, "output": out}, (("user", user, None), ("assistant", out, None))


def bad_alpaca(g: Gen) -> tuple[dict[str, Any], str]:
    row, _ = good_alpaca(g)
    kind = g.rng.choice(["output", "type", "empty"])
    if kind == "output":
        del row["output"]
        return row, 'missing key "output"'
    if kind == "type":
        row["instruction"] = [row["instruction"]]
        return row, "instruction: expected a string, got an array"
    row["output"] = ""
    return row, "output: empty"


def good_text(g: Gen) -> tuple[dict[str, Any], Content]:
    t = g.text(1, 200)
    return {"text": t, "meta": g.rng.randint(0, 9)}, t


def bad_text(g: Gen) -> tuple[dict[str, Any], str]:
    kind = g.rng.choice(["type", "empty", "key"])
    if kind == "type":
        return {"text": g.rng.randint(0, 9)}, "text: expected a string, got a number"
    if kind == "empty":
        return {"text": " \n "}, "text: empty"
    return {"txt": g.text()}, 'missing key "text"'


Maker = Callable[[Gen], tuple[dict[str, Any], Any]]
FORMATS: dict[str, tuple[Maker, Maker]] = {
    "messages": (good_messages, bad_messages),
    "sharegpt": (good_sharegpt, bad_sharegpt),
    "alpaca": (good_alpaca, bad_alpaca),
    "text": (good_text, bad_text),
}


# --- files --------------------------------------------------------------------------------------


def with_bad_byte(raw: bytes) -> bytes:
    """Put an invalid UTF-8 byte inside the first string value of a serialized row."""
    i = raw.index(b'": "') + 4
    return raw[:i] + b"\xff" + raw[i:]


def write_jsonl(g: Gen, path: Path, fmt: str, n: int) -> None:
    good, bad = FORMATS[fmt]
    out: list[bytes] = []
    for k in range(n):
        if g.rng.random() < 0.05:
            out.append(g.rng.choice([b"", b"   ", b"\t"]))  # blank lines are not rows
        ref = RowRef(str(path), len(out) + 1)
        roll = g.rng.random() if k else 1.0  # the first row is good, so auto-detection is sure
        if roll < 0.18:
            row, reason = bad(g)
            out.append(json.dumps(row).encode())
            g.expected.append(Expect(ref, reason=reason))
        elif roll < 0.22:
            out.append(with_bad_byte(json.dumps(good(g)[0]).encode()))
            g.expected.append(Expect(ref, reason="invalid UTF-8: byte 0xff at column"))
        elif roll < 0.26:
            raw = json.dumps(good(g)[0]).encode()
            out.append(raw[: g.rng.randint(1, len(raw) - 1)])
            g.expected.append(Expect(ref, reason="invalid JSON: "))
        elif roll < 0.28:
            out.append(json.dumps(g.rng.choice([[1, 2], "row", 3, None])).encode())
            g.expected.append(Expect(ref, reason="row is "))
        else:
            row, content = good(g)
            out.append(json.dumps(row, ensure_ascii=g.rng.random() < 0.5).encode())
            g.expected.append(Expect(ref, good=content))
    path.write_bytes(b"\n".join(out) + b"\n")


def write_json_array(g: Gen, path: Path, n: int) -> None:
    """An array of `messages` rows, some spread over lines, ending in a truncated item."""
    parts, line = [b"[\n"], 2
    for k in range(n):
        ref = RowRef(str(path), line)
        roll = g.rng.random() if k else 1.0
        if k == n - 1:
            raw = json.dumps(good_messages(g)[0], indent=1).encode()
            raw = raw[: g.rng.randint(1, len(raw) - 1)]
            g.expected.append(Expect(ref, reason=f"invalid JSON in item {k + 1}: "))
        elif roll < 0.15:
            row, reason = bad_messages(g)
            raw = json.dumps(row, indent=g.rng.choice([None, 2])).encode()
            g.expected.append(Expect(ref, reason=reason))
        elif roll < 0.2:
            raw = json.dumps(g.rng.choice([[1], "s", 7])).encode()
            g.expected.append(Expect(ref, reason=f"item {k + 1} is "))
        elif roll < 0.25:
            raw = with_bad_byte(json.dumps(good_messages(g)[0]).encode())
            g.expected.append(Expect(ref, reason="invalid UTF-8: byte 0xff"))
        else:
            row, content = good_messages(g)
            raw = json.dumps(row, indent=g.rng.choice([None, 2])).encode()
            g.expected.append(Expect(ref, good=content))
        sep = b"" if k == n - 1 else g.rng.choice([b",\n", b", ", b"\n,\n  "])
        parts += [raw, sep]
        line += raw.count(b"\n") + sep.count(b"\n")
    path.write_bytes(b"".join(parts))


def write_csv(g: Gen, path: Path, n: int) -> None:
    """Alpaca columns; bad records lack or add a column, hold an invalid byte or an empty output."""
    parts, line = [b"instruction,input,output\n"], 2
    for _ in range(n):
        if g.rng.random() < 0.05:
            parts.append(b"\n")
            line += 1
        ref = RowRef(str(path), line)
        row, content = good_alpaca(g)
        fields = [row["instruction"], row["input"], row["output"]]
        roll = g.rng.random()
        if roll < 0.06:
            fields = fields[:2]
            g.expected.append(
                Expect(ref, reason="CSV row has 2 fields but the header has 3 (missing: output)")
            )
        elif roll < 0.09:
            fields.append(g.text())
            g.expected.append(Expect(ref, reason="CSV row has 4 fields but the header has 3"))
        elif roll < 0.13:
            fields[1] = BAD + fields[1]
            g.expected.append(Expect(ref, reason="invalid UTF-8: byte 0xff in column 'input'"))
        elif roll < 0.17:
            fields[2] = ""
            g.expected.append(Expect(ref, reason="output: empty"))
        elif roll < 0.2 and g.huge("csv"):
            fields[2] = "y" * HUGE
            g.expected.append(Expect(ref, reason="output: field too long"))
        else:
            g.expected.append(Expect(ref, good=content))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        raw = buf.getvalue().encode().replace(BAD.encode(), b"\xff")
        parts.append(raw)
        line += raw.count(b"\n")
    path.write_bytes(b"".join(parts))


def write_parquet(g: Gen, path: Path, n: int) -> None:
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("conversations", pa.list_(turn)), ("system", pa.string())])
    rows = []
    for k in range(n):
        ref = RowRef(str(path), k + 1, "row")
        if k and g.rng.random() < 0.2:
            row, reason = bad_sharegpt(g)
            if "conversations" not in row:
                row = {"conversations": [], "system": "s"}
                reason = "conversations: empty array"
            g.expected.append(Expect(ref, reason=reason))
        else:
            row, content = good_sharegpt(g)
            g.expected.append(Expect(ref, good=content))
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=200)


def generate(root: Path, seed: int) -> list[Expect]:
    g = Gen(random.Random(seed))
    write_jsonl(g, root / "a_messages.jsonl", "messages", 1200)
    write_jsonl(g, root / "b_sharegpt.jsonl", "sharegpt", 700)
    write_jsonl(g, root / "c_alpaca.jsonl", "alpaca", 500)
    write_jsonl(g, root / "d_text.jsonl", "text", 400)
    write_csv(g, root / "e_alpaca.csv", 300)
    write_json_array(g, root / "f_messages.json", 300)
    write_parquet(g, root / "g_sharegpt.parquet", 300)
    return g.expected


def content_of(sample: Any) -> Content:
    if isinstance(sample, TextSample):
        return sample.text
    assert isinstance(sample, Conversation)
    return tuple((m.role, m.content, m.weight) for m in sample.messages)


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 2024])
def test_fuzzed_files_every_row_kept_or_reported_at_its_line(tmp_path: Path, seed: int) -> None:
    start = time.perf_counter()
    expected = generate(tmp_path, seed)
    goods = [e for e in expected if e.good is not None]
    bads = [e for e in expected if e.reason is not None]
    assert len(expected) >= 3000 and len(bads) > 400
    assert {e.ref.file for e in bads} == {str(p) for p in tmp_path.iterdir()}

    result = read_samples(str(tmp_path), on_error="skip")

    assert result.rows_read == len(expected)
    assert [i.ref for i in result.issues] == [e.ref for e in bads]
    for issue, e in zip(result.issues, bads, strict=True):
        assert issue.reason.startswith(e.reason), (str(issue), e.reason)
    assert [s.source for s in result.samples] == [e.ref for e in goods]
    assert [content_of(s) for s in result.samples] == [e.good for e in goods]
    huge = [i.ref.file for i in result.issues if "field too long" in i.reason]
    assert [Path(f).suffix for f in huge] == [".jsonl", ".csv"]

    for path in sorted(tmp_path.iterdir()):
        first_bad = next(e for e in bads if e.ref.file == str(path))
        with pytest.raises(BadRowError) as info:
            read_samples(str(path), on_error="raise")
        assert info.value.issue.ref == first_bad.ref
        assert str(info.value).startswith(f"{first_bad.ref}: {first_bad.reason}")
        assert str(info.value).endswith("set data.on_error: skip to skip bad rows")

    print(f"\nfuzz seed {seed}: {len(expected)} rows, {len(bads)} bad, {time.perf_counter() - start:.2f} s")


# --- tokenizing and streaming stages -------------------------------------------------------------
# Hostile rows through the whole build: in memory (in worker processes when large), and streamed.
# Rows containing BOOM pass validation and then make the chat template raise, as a template bug
# or an unusual row would; every other hostile row is refused while reading or validating.

BOOM_TEMPLATE = (
    "{% for m in messages %}{% if 'BOOM' in (m['content'] or '') %}{{ 1 // 0 }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


def hostile(g: Gen, full_depth: bool) -> tuple[bytes, str]:
    """One hostile JSON Lines row and the reason prefix it must be reported with."""
    row, _ = good_messages(g)
    turns = row["messages"]
    kind = g.rng.choice(["deep", "surrogate", "key", "type", "empty", "utf8", "boom", "array", "cut", "huge"])
    if kind == "deep":
        return nested(100_000 if full_depth else g.rng.randint(101, 3000)), "nested too deeply"
    if kind == "surrogate":
        i = g.rng.randrange(len(turns))
        turns[i]["content"] = "a\udbff"
        raw = json.dumps(row).encode()  # ensure_ascii writes the lone half as a \udbff escape
        return raw, f"messages[{i}].content: lone surrogate \\udbff at character 2"
    if kind == "key":
        return json.dumps({**row, "\udc80": 1}).encode(), "row: lone surrogate \\udc80"
    if kind == "huge" and g.huge("hostile"):
        i = _pick(g, turns, "user")
        turns[i]["content"] = "z" * HUGE
        return json.dumps(row).encode(), f"messages[{i}].content: field too long"
    if kind == "boom":
        i = _pick(g, turns, "assistant")
        turns[i]["content"] = "BOOM " + g.text()
        return json.dumps(row).encode(), "chat template: ZeroDivisionError"
    if kind == "array":
        return b"[1, 2]", "row is an array"
    if kind == "cut":
        raw = json.dumps(row).encode()
        return raw[: g.rng.randint(1, len(raw) - 1)], "invalid JSON: "
    if kind == "utf8":
        return with_bad_byte(json.dumps(row).encode()), "invalid UTF-8: byte 0xff at column"
    if kind == "empty":
        i = _pick(g, turns, "user")
        turns[i]["content"] = ""
        return json.dumps(row).encode(), f"messages[{i}].content: empty user message"
    i = g.rng.randrange(len(turns))
    turns[i]["content"] = g.rng.choice([42, True, {"text": "x"}])
    return json.dumps(row).encode(), f"messages[{i}].content: expected a string or an array of text parts"


def write_hostile(root: Path, n: int, seed: int) -> tuple[Path, Path, list[Expect]]:
    """A mixed file, the same file's good rows alone, and what each mixed row must become."""
    g = Gen(random.Random(seed))
    mixed, clean = root / "mixed.jsonl", root / "clean.jsonl"
    lines: list[bytes] = []
    good_lines: list[bytes] = []
    deep_left = 3  # a few rows nested 100,000 levels; the rest are cheaper to write
    for k in range(n):
        ref = RowRef(str(mixed), len(lines) + 1)
        if k and g.rng.random() < 0.3:
            raw, reason = hostile(g, full_depth=deep_left > 0 and g.rng.random() < 0.1)
            deep_left -= raw.startswith(b'{"messages": [[[[')
            g.expected.append(Expect(ref, reason=reason))
        else:
            raw = json.dumps(good_messages(g)[0], ensure_ascii=g.rng.random() < 0.5).encode()
            g.expected.append(Expect(ref, good=()))
            good_lines.append(raw)
        lines.append(raw)
    mixed.write_bytes(b"\n".join(lines) + b"\n")
    clean.write_bytes(b"\n".join(good_lines) + b"\n")
    return mixed, clean, g.expected


def _data_config(path: Path, template: Path, **options: Any) -> Any:
    from tunesmith.config.schema import DataConfig

    return DataConfig(
        train=[{"path": str(path)}],
        seq_len=512,
        template=str(template),
        on_error="skip",
        cache=False,
        shuffle=False,
        num_proc=2,
        max_dropped_fraction=1.0,
        **options,
    )


def _one_pass(rows: Any) -> list[Any]:
    """The samples of exactly one pass over the streamed files."""
    samples = []
    while True:
        row = rows.next_row()
        if rows.position.passes:
            return samples
        samples.extend(row)


def run_hostile_build(tmp_path: Path, tokenizer: Any, n: int, seed: int) -> None:
    from tunesmith.data.build import build_data
    from tunesmith.data.stream_build import build_streaming

    mixed, clean, expected = write_hostile(tmp_path, n, seed)
    template = tmp_path / "boom.jinja"
    template.write_text(BOOM_TEMPLATE, encoding="utf-8")
    bads = [e for e in expected if e.reason is not None]
    good_lines = [e.ref.line for e in expected if e.good is not None]
    kinds = {e.reason.split(":")[0] for e in bads}
    assert {"nested too deeply", "row", "chat template", "invalid UTF-8"} <= kinds

    built = build_data(_data_config(mixed, template), tokenizer, "sft")
    reference = build_data(_data_config(clean, template), tokenizer, "sft").train
    assert built.report.rows_read == n
    issues = sorted(built.report.skipped + built.report.dropped, key=lambda i: i.ref.line)
    assert [i.ref for i in issues] == [e.ref for e in bads]
    for issue, e in zip(issues, bads, strict=True):
        assert issue.reason.startswith(e.reason), (str(issue), e.reason)
    kept = sorted(built.train, key=lambda s: s.source.line)
    assert [s.source.line for s in kept] == good_lines
    assert [(s.input_ids, s.labels) for s in kept] == [(s.input_ids, s.labels) for s in reference]
    assert built.report.trained_tokens == sum(s.num_trained for s in reference) > 0

    cfg = _data_config(mixed, template, streaming=True, stream_block_rows=max(50, n // 7))
    rows, _, report = build_streaming(cfg, tokenizer, "sft", seed=0)
    streamed = sorted(_one_pass(rows), key=lambda s: s.source.line)
    assert [(s.input_ids, s.labels) for s in streamed] == [(s.input_ids, s.labels) for s in reference]
    assert report.rows_read == n
    stream_issues = sorted(report.skipped + report.dropped, key=lambda i: i.ref.line)
    assert [(i.ref, i.reason) for i in stream_issues] == [(i.ref, i.reason) for i in issues]


def test_hostile_rows_through_tokenizing_and_streaming_small(tmp_path: Path, tokenizer: Any) -> None:
    run_hostile_build(tmp_path, tokenizer, 300, seed=11)


@pytest.mark.slow
def test_hostile_rows_through_tokenizing_and_streaming_10k(tmp_path: Path, tokenizer: Any) -> None:
    start = time.perf_counter()
    run_hostile_build(tmp_path, tokenizer, 10_000, seed=5)
    print(f"\nhostile build: 10,000 rows in {time.perf_counter() - start:.1f} s")
