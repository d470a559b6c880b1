"""tunesmith synth: readers, chunking, parsing, filters, and the pipeline against a stub model.

The stub answers at the HTTP layer (httpx.MockTransport) with the outputs models really give:
fenced JSON, prose around JSON, too many items, a question copied from the prompt, a one-item list,
empty and cut-off answers, 429 and 500 responses. The HTTP client and the pipeline are the real ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from tunesmith.cli.synth_cmd import add_synth_parser, run_synth
from tunesmith.data.validate import read_samples
from tunesmith.synth.chunking import chunk_by_headings, chunk_by_tokens
from tunesmith.synth.config import SynthConfig, load_synth_config
from tunesmith.synth.filters import Row, apply_filters, jaccard, shingles
from tunesmith.synth.parse import parse_answer, parse_questions
from tunesmith.synth.pipeline import synthesize
from tunesmith.synth.readers import Document, normalise, read_document

DOC = """# Pumps

## Priming

The pump must be primed with water before the first
start. Priming re-
moves air from the casing.

## Seals

The shaft seal is replaced every two years. A leaking seal drips near the shaft.

# Broken

Zebra paragraph that the model never manages to read.
"""

QUESTIONS = {
    "Priming": '```json\n["Why must the pump be primed?", "What does priming remove?", "Who invented the pump?"]\n```\nHope this helps!',
    "shaft seal": 'Here are the questions: ["How often is the shaft seal replaced?", '
    '"How often is the shaft seal replaced ?", "write 3 questions that it answers?", '
    '"Where does a leaking seal drip?"] Let me know.',
    "Zebra": "I cannot do that.",
}
ANSWERS = {
    "Why must the pump be primed?": ['["The pump must be primed with water before the first start."]'],
    "What does priming remove?": ["", "Priming removes air from the casing."],
    "Who invented the pump?": ["Archimedes invented it in ancient Syracuse."],
    "How often is the shaft seal replaced?": ["Answer: The shaft seal is replaced every two years."],
    "How often is the shaft seal replaced ?": ["The shaft seal is replaced every two years."],
    "Where does a leaking seal drip?": ["A leaking seal drips near the"],  # always cut off
}


class Stub:
    """An OpenAI-compatible /chat/completions that answers from the tables above, counting requests."""

    def __init__(self, fail_on: str | None = None, first_429: bool = False) -> None:
        self.requests: list[str] = []
        self.fail_on, self.first_429 = fail_on, first_429
        self.answer_calls: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        user = body["messages"][-1]["content"]
        self.requests.append(user)
        if self.first_429 and len(self.requests) == 1:
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        if self.fail_on and self.fail_on in user:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        finish = "stop"
        if user.startswith("Read the text"):
            text = next(v for k, v in QUESTIONS.items() if k in user)
        else:
            q = user.rsplit("Question: ", 1)[1]
            i = self.answer_calls.get(q, 0)
            self.answer_calls[q] = i + 1
            replies = ANSWERS[q]
            text = replies[min(i, len(replies) - 1)]
            finish = "length" if q.startswith("Where") else "stop"
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


def _cfg(tmp_path: Path, **kw: object) -> SynthConfig:
    base = {
        "endpoint": "http://stub/v1",
        "questions_per_chunk": 3,
        "backoff_s": 0,
        "retries": 1,
        "parse_retries": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    return SynthConfig.model_validate(base | kw)


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "manual.md"
    path.write_text(DOC, encoding="utf-8")
    return path


def test_normalise_joins_lines_and_hyphenation() -> None:
    assert normalise("a  long\nline with hyphen-\nated word\n\n\n# Head\nnext") == (
        "a long line with hyphenated word\n\n# Head\nnext"
    )


def test_readers_html_pdf_docx(tmp_path: Path) -> None:
    html = tmp_path / "a.html"
    html.write_text(
        "<html><head><style>x{}</style></head><body><h1>Title</h1><p>One\n two.</p>"
        "<script>no()</script><h2>Sub</h2><p>Three.</p></body></html>"
    )
    assert read_document(html).text == "# Title\n\nOne two.\n\n# Sub\n\nThree.".replace("# Sub", "## Sub")

    from fpdf import FPDF

    pdf = FPDF()
    for body in ("First page about valves.", "Second page about pumps."):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.cell(0, 10, body)
    pdf.output(str(tmp_path / "b.pdf"))
    d = read_document(tmp_path / "b.pdf")
    assert [d.text[s:e] for _, s, e in d.pages] == ["First page about valves.", "Second page about pumps."]
    assert [(c.page, c.text) for c in chunk_by_headings(d, 2000)] == [
        (1, d.text[: d.pages[0][2]]),
        (2, d.text[d.pages[1][1] :]),
    ]

    import docx

    w = docx.Document()
    w.add_heading("Manual", level=1)
    w.add_paragraph("Turn the knob.")
    w.save(str(tmp_path / "c.docx"))
    assert read_document(tmp_path / "c.docx").text == "# Manual\n\nTurn the knob."


def test_chunk_by_headings_paths_offsets_and_cap(doc: Path) -> None:
    d = read_document(doc)
    chunks = chunk_by_headings(d, 2000)
    assert [c.headings for c in chunks] == [("Pumps", "Priming"), ("Pumps", "Seals"), ("Broken",)]
    assert all(d.text[c.start : c.end] == c.text for c in chunks)
    assert "Priming removes air" in chunks[0].text
    small = chunk_by_headings(d, 60)
    seal = [c.text for c in small if c.headings == ("Pumps", "Seals")]
    assert seal == [
        "## Seals\n\nThe shaft seal is replaced every two years.",
        "A leaking seal drips near the shaft.",
    ]


def test_chunk_by_tokens_overlap_whole_sentences() -> None:
    d = Document("x", "One two three. Four five six. Seven eight nine. Ten eleven twelve.")
    chunks = chunk_by_tokens(d, lambda s: len(s.split()), max_tokens=6, overlap=3)
    assert [c.text for c in chunks] == [
        "One two three. Four five six.",
        "Four five six. Seven eight nine.",
        "Seven eight nine. Ten eleven twelve.",
    ]


def test_parse_repairs_and_refusals() -> None:
    p = parse_questions('```json\n["A b c?", "D e f?"]\n```', 2, "prompt")
    assert p.value == ["A b c?", "D e f?"] and p.repairs == ["code fence removed"]
    p = parse_questions('["A b c?", "D e f?", "G h', 3, "prompt", truncated=True)
    assert p.value == ["A b c?", "D e f?"] and "truncated JSON: complete items kept" in p.repairs
    p = parse_questions("1. What is x?\n2. Why is y?\nthanks", 5, "prompt")
    assert p.value == ["What is x?", "Why is y?"]
    assert parse_questions("", 2, "p").error == "empty output"
    p = parse_questions("Sure! Here: What is x? And also: why is y?", 3, "prompt")
    assert p.value == ["What is x?", "why is y?"] and p.repairs == ["questions taken from prose"]
    assert parse_questions('{"questions": ["Copy me?"]}', 2, "please copy me now").error is not None
    assert parse_answer('["only"]', "q?", False).value == "only"
    assert parse_answer('["a", "b"]', "q?", False).error == "a list of 2 answers where one was asked"
    assert parse_answer("<think>hmm</think>It is 4.", "q?", False).value == "It is 4."
    assert parse_answer("x", "q?", True).error == "answer cut off at the token limit"
    assert parse_answer("What is x?", "What is x?", False).error == "answer repeats the question"


def test_filters_count_each_reason() -> None:
    chunk = "The valve opens at two bar of pressure."
    rows = [
        Row(q, a, chunk, {})
        for q, a in [
            ("When does the valve open?", "At two bar of pressure."),
            ("When does the valve open", "At two bar."),
            ("When does the valve open at all?", "At two bar."),
            ("Who made the valve?", "Acme Corporation engineers in Ohio."),
            ("Hi?", "Two bar."),
        ]
    ]
    assert jaccard(shingles("when does the valve open at all"), shingles("when does the valve open")) >= 0.5
    kept, removed = apply_filters(rows, SynthConfig().filters.model_copy(update={"near_dup_threshold": 0.5}))
    assert [r.question for r in kept] == ["When does the valve open?"]
    assert removed == {"exact_duplicate": 1, "near_duplicate": 1, "ungrounded": 1, "question_length": 1}


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_pipeline_repairs_skips_provenance_and_data_check(doc: Path, tmp_path: Path) -> None:
    stub = Stub(first_429=True)
    out = tmp_path / "data.jsonl"
    s = synthesize([str(doc)], out, _cfg(tmp_path), transport=httpx.MockTransport(stub))
    rows = _read(out)
    got = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert got == {
        "Why must the pump be primed?": "The pump must be primed with water before the first start.",
        "What does priming remove?": "Priming removes air from the casing.",
        "How often is the shaft seal replaced?": "The shaft seal is replaced every two years.",
    }
    assert (s.documents, s.chunks, s.chunks_skipped, s.rows_generated, s.rows_kept) == (1, 3, 1, 5, 3)
    assert s.removed == {"ungrounded": 1, "exact_duplicate": 1}
    # questions: 3 chunks + 1 retry of the unreadable one + 1 after the 429;
    # answers: 6 questions + 1 retry of the empty answer + 1 retry of the cut-off one
    assert len(stub.requests) == s.requests == (3 + 1 + 1) + (6 + 1 + 1)
    assert s.retries == 1 and s.prompt_tokens == 10 * (s.requests - 1)
    assert s.repairs["code fence removed"] == 1 and s.repairs["prose around JSON removed"] == 1
    assert (
        s.repairs["question copied from the prompt dropped"] == 1
        and s.repairs["one-item list unwrapped"] == 1
    )
    reasons = {(x["chunk"], x.get("question"), x["reason"]) for x in s.skipped}
    assert reasons == {
        (1, "Where does a leaking seal drip?", "answer cut off at the token limit"),
        (2, None, "no JSON list of questions and no question in the output"),
    }
    text = read_document(doc).text
    for r in rows:
        p = r["provenance"]
        span = text[p["start"] : p["end"]]
        assert r["messages"][1]["content"].rstrip(".") in span
        assert p["file"] == str(doc) and p["headings"][0] == "Pumps"
    assert read_samples(str(out), "auto", "raise").rows_read == 3


@pytest.mark.parametrize(
    ("fmt", "detected"), [("sharegpt", "sharegpt"), ("alpaca", "alpaca"), ("openai", "messages")]
)
def test_every_format_passes_the_data_check(doc: Path, tmp_path: Path, fmt: str, detected: str) -> None:
    out = tmp_path / f"{fmt}.jsonl"
    synthesize([str(doc)], out, _cfg(tmp_path, format=fmt), transport=httpx.MockTransport(Stub()))
    result = read_samples(str(out), "auto", "raise")
    assert result.rows_read == 3 and result.formats == {str(out): detected}
    assert all("provenance" in r for r in _read(out))


def test_interrupted_run_resumes_without_repeating_requests(doc: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.jsonl"
    first = Stub(fail_on="shaft seal")  # the Seals chunk fails for good: not cached
    s1 = synthesize([str(doc)], out, _cfg(tmp_path), transport=httpx.MockTransport(first))
    assert s1.chunks_skipped == 2 and "HTTP 500" in s1.skipped[0]["reason"] + s1.skipped[1]["reason"]
    second = Stub()
    s2 = synthesize([str(doc)], out, _cfg(tmp_path), transport=httpx.MockTransport(second))
    assert s2.chunks_cached == 2
    assert second.requests and all("shaft seal" in r for r in second.requests)
    assert len(second.requests) == 1 + 3 + 1  # questions, three answers, one retry of the cut-off answer
    third = Stub()
    s3 = synthesize([str(doc)], out, _cfg(tmp_path), transport=httpx.MockTransport(third))
    assert third.requests == [] and s3.requests == 0 and s3.chunks_cached == 3
    assert len(_read(out)) == 3


def test_config_file_and_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "synth.yaml"
    cfg_file.write_text(
        "synth:\n  model: m1\n  questions_per_chunk: 5\n  chunking: {mode: tokens, max_tokens: 64}\n"
    )
    cfg = load_synth_config(cfg_file, {"model": "m2", "format": None})
    assert (cfg.model, cfg.questions_per_chunk, cfg.chunking.mode) == ("m2", 5, "tokens")
    parser = argparse.ArgumentParser()
    add_synth_parser(parser.add_subparsers())
    (tmp_path / "bad.yaml").write_text("synth:\n  modle: x\n")
    args = parser.parse_args(["synth", "a.md", "--out", "o.jsonl", "--config", str(tmp_path / "bad.yaml")])
    assert run_synth(args) == 2
    assert "modle" in capsys.readouterr().err
    args = parser.parse_args(["synth", str(tmp_path / "missing.md"), "--out", str(tmp_path / "o.jsonl")])
    assert run_synth(args) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_fails_when_every_chunk_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from tunesmith.cli.synth_cmd import add_synth_parser, run_synth

    with socket.socket() as probe:  # a local port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    doc = tmp_path / "notes.md"
    doc.write_text("# Pumps\n\nThe pump moves water uphill. It runs on solar power.\n", encoding="utf-8")
    config = tmp_path / "synth.yaml"
    config.write_text("synth:\n  retries: 0\n  backoff_s: 0\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_synth_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "synth",
            str(doc),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--config",
            str(config),
            "--endpoint",
            f"http://127.0.0.1:{port}/v1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert run_synth(args) == 1
    err = capsys.readouterr().err
    assert "every chunk was skipped" in err and f"127.0.0.1:{port}" in err
