"""tunesmith synth: judge, token chunking from the CLI, token and cost counts, template checks,
repairs counted on resume, and provenance offsets for every reader.

The model is a stub: httpx.MockTransport for the Python API, a threaded local HTTP server for the
CLI (which builds its own client). The HTTP client and the pipeline are the real ones.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from test_synth import Stub

from tunesmith.cli.synth_cmd import add_synth_parser, run_synth
from tunesmith.config.load import ConfigError
from tunesmith.synth.config import SynthConfig
from tunesmith.synth.pipeline import synthesize
from tunesmith.synth.readers import read_document

Reply = dict[str, Any]


def _reply(content: str, prompt_tokens: int | None = 10, completion_tokens: int = 5) -> Reply:
    body: Reply = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ]
    }
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return body


def _transport(answer: Callable[[str], Reply], log: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["messages"][-1]["content"]
        log.append(user)
        return httpx.Response(200, json=answer(user))

    return httpx.MockTransport(handle)


@pytest.fixture
def served() -> Iterator[Callable[[Callable[[str], Reply]], tuple[str, list[str]]]]:
    """A local OpenAI-compatible endpoint in a thread: returns (base URL, log of user prompts)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(answer: Callable[[str], Reply]) -> tuple[str, list[str]]:
        log: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                log.append(user)
                data = json.dumps(answer(user)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", log

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _chunk_of(user: str) -> str:
    return user.split("Text:\n", 1)[1].split("\n\nQuestion: ", 1)[0]


def _tag(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def echo_model(user: str) -> Reply:
    """One question per chunk that names the chunk; the answer is the chunk's first sentence."""
    chunk = _chunk_of(user)
    if user.startswith("Read the text"):
        return _reply(json.dumps([f"What does passage {_tag(chunk)} say?"]))
    body = re.sub(r"^#+ .*\n+", "", chunk)
    return _reply(re.split(r"(?<=\.)\s", body, maxsplit=1)[0])


def _cfg(tmp_path: Path, **kw: Any) -> SynthConfig:
    base = {"endpoint": "http://stub/v1", "backoff_s": 0, "retries": 0, "parse_retries": 1}
    return SynthConfig.model_validate(base | {"cache_dir": str(tmp_path / "cache")} | kw)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_synth_parser(parser.add_subparsers(dest="command"))
    return run_synth(parser.parse_args(["synth", *argv]))


# --- 3. judge --------------------------------------------------------------------------------------

QA = {
    "What does the relief valve do?": ("It opens at six bar.", "5"),
    "When does the relief valve close?": ("It closes at five bar.", "Score: 2/5"),
    "Which colour is the relief valve?": ("The relief valve is red.", '{"score": 4}'),
    "Who services the relief valve?": ("The relief valve is serviced yearly.", "It looks fine to me."),
}


def judge_model(user: str) -> Reply:
    if user.startswith("Read the text"):
        return _reply(json.dumps(list(QA)))
    if user.startswith("Rate the answer"):
        q = user.split("Question: ", 1)[1].split("\n", 1)[0]
        return _reply(QA[q][1])
    return _reply(QA[user.rsplit("Question: ", 1)[1]][0])


def test_judge_keeps_pairs_at_or_above_threshold_counts_and_caches(tmp_path: Path) -> None:
    doc = tmp_path / "v.md"
    doc.write_text(
        "# Valve\n\nThe red relief valve opens at six bar, closes at five bar and is serviced yearly.\n"
    )
    log: list[str] = []
    cfg = _cfg(tmp_path, questions_per_chunk=4, judge={"threshold": 4}, filters={"min_grounding": 0})
    s = synthesize([str(doc)], tmp_path / "o.jsonl", cfg, transport=_transport(judge_model, log))
    kept = {r["messages"][0]["content"] for r in _rows(tmp_path / "o.jsonl")}
    assert kept == {"What does the relief valve do?", "Which colour is the relief valve?"}
    assert s.removed == {"judge": 1, "judge_unrated": 1} and s.judged == 3 and s.rows_kept == 2
    judge_prompts = [u for u in log if u.startswith("Rate the answer")]
    assert len(judge_prompts) == 4 + 1  # one per pair, one retry of the output with no score
    assert any("Answer: It opens at six bar." in u and "six bar, closes" in u for u in judge_prompts)
    assert s.requests == 1 + 4 + 5 and s.repairs == {"score taken from prose": 1}
    assert any(
        x.get("question") == "Who services the relief valve?" and x["reason"].startswith("judge:")
        for x in s.skipped
    )
    # resumed: the scores come from the cache, also when only the threshold changes
    again: list[str] = []
    s2 = synthesize(
        [str(doc)],
        tmp_path / "o.jsonl",
        cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"threshold": 5})}),
        transport=_transport(judge_model, again),
    )
    assert again == [] and s2.removed == {"judge": 2, "judge_unrated": 1} and s2.rows_kept == 1
    assert s2.repairs == s.repairs


# --- 4. chunks by tokens of the target tokenizer, from the CLI --------------------------------------

SENTENCES = [
    "The pump moves water from the lower tank to the roof.",
    "Its impeller turns at about three thousand revolutions per minute.",
    "A pressure switch stops the motor when the roof tank is full.",
    "Every spring the strainer is cleaned and the seals are inspected.",
    "Electrically, the motor draws nine amperes at full load.",
    "An antidisestablishmentarianism-style overlong compound word is not a sentence break here.",
]


def test_cli_chunks_by_tokens_of_the_tokenizer_between_sentences(
    served: Any, tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, log = served(echo_model)
    doc = tmp_path / "pump.txt"
    doc.write_text(" ".join(SENTENCES) + "\n", encoding="utf-8")
    n_tokens = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    sizes = [n_tokens(s) for s in SENTENCES]
    cap, overlap = max(sizes) + min(sizes), max(sizes)
    argv = [
        str(doc),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--endpoint",
        url,
        "--questions",
        "1",
        "--cache-dir",
        str(tmp_path / "c"),
        "--chunk-tokens",
        str(cap),
        "--overlap",
        str(overlap),
        "--tokenizer",
        "default",
    ]
    assert _cli(argv) == 0
    chunks = [_chunk_of(u) for u in log if u.startswith("Read the text")]
    # independently: greedy windows of whole sentences under the cap, the next one starting with the
    # last sentences of the previous that fit in the overlap
    expected, i = [], 0
    while True:
        j = i + 1
        while j < len(SENTENCES) and n_tokens(" ".join(SENTENCES[i : j + 1])) <= cap:
            j += 1
        expected.append(" ".join(SENTENCES[i:j]))
        if j == len(SENTENCES):
            break
        k = j
        while k - 1 > i and n_tokens(" ".join(SENTENCES[k - 1 : j])) <= overlap:
            k -= 1
        i = k
    assert sorted(chunks) == sorted(expected) and len(expected) > 2
    assert all(n_tokens(c) <= cap for c in chunks)
    # counted as words instead, the same caps give other chunks: the tokenizer is what counted
    words_log: list[str] = []
    cfg = _cfg(
        tmp_path,
        questions_per_chunk=1,
        cache_dir=str(tmp_path / "c2"),
        chunking={"mode": "tokens", "max_tokens": cap, "overlap": overlap},
    )
    synthesize([str(doc)], tmp_path / "w.jsonl", cfg, transport=_transport(echo_model, words_log))
    assert sorted(_chunk_of(u) for u in words_log if u.startswith("Read the text")) != sorted(chunks)


def test_sentence_over_the_cap_is_cut_between_words(tokenizer: Any, tmp_path: Path) -> None:
    from tunesmith.synth.chunking import chunk_by_tokens, token_counter
    from tunesmith.synth.readers import Document

    long = " ".join(f"word{i}" for i in range(60)) + "."
    count = token_counter("default")
    chunks = chunk_by_tokens(Document("x", long), count, max_tokens=20, overlap=0)
    assert len(chunks) > 2 and " ".join(c.text for c in chunks) == long
    assert all(count(c.text) <= 20 for c in chunks)
    assert all(re.fullmatch(r"(word\d+ )*word\d+\.?", c.text) for c in chunks)  # no word cut in two
    with pytest.raises(Exception, match="no tokenizer in that folder"):
        token_counter(str(tmp_path))


def test_cli_flags_map_onto_the_config(tmp_path: Path) -> None:
    from tunesmith.synth.config import load_synth_config

    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(
        "synth:\n  chunking: {max_chars: 900, overlap: 5}\n  judge: {scale: 10, threshold: 7}\n"
    )
    cfg = load_synth_config(
        cfg_file,
        {
            "chunking": {"mode": "tokens", "max_tokens": 99, "overlap": None, "tokenizer": "default"},
            "judge": {"threshold": 9},
            "reasoning": "keep",
        },
    )
    assert cfg.chunking.model_dump() == {
        "mode": "tokens",
        "max_chars": 900,
        "max_tokens": 99,
        "overlap": 5,
        "tokenizer": "default",
    }
    assert (
        cfg.judge is not None
        and (cfg.judge.scale, cfg.judge.threshold) == (10, 9)
        and cfg.reasoning == "keep"
    )
    assert load_synth_config(None, {"judge": {"threshold": None}}).judge is None  # no flag: no judge


def test_window_search_matches_a_linear_scan() -> None:
    import random

    from tunesmith.synth.chunking import _window_end

    rng = random.Random(1)
    for _ in range(5000):
        lens = [rng.randint(1, 9) for _ in range(rng.randint(1, 12))]
        pieces, pos = [], 0
        for n in lens:
            pieces.append((pos, pos + n))
            pos += n + 1
        cap, i = rng.randint(1, 40), rng.randrange(len(lens))
        j = i + 1
        while j < len(pieces) and pieces[j][1] - pieces[i][0] <= cap:
            j += 1
        assert _window_end(pieces, i, lambda a, b: b - a, cap) == j


# --- 5. tokens and cost ------------------------------------------------------------------------------


def test_tokens_summed_from_usage_and_cost(
    served: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[int, int]] = []

    def model(user: str) -> Reply:
        reply = echo_model(user)
        if "passage" in user and len(seen) == 2:  # one server that leaves usage out of a reply
            reply.pop("usage", None)
            seen.append((0, 0))
            return reply
        usage = (len(user), len(reply["choices"][0]["message"]["content"]))
        seen.append(usage)
        reply["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
        return reply

    url, _ = served(model)
    doc = tmp_path / "d.md"
    doc.write_text(
        "# A\n\nThe tank holds forty litres. It is steel.\n\n# B\n\nThe hose is four metres long.\n"
    )
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "synth:\n  questions_per_chunk: 1\n  prices: {prompt: 0.5, completion: 2.0, currency: EUR}\n"
    )
    summary_json = tmp_path / "sum.json"
    argv = [
        str(doc),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--endpoint",
        url,
        "--config",
        str(cfg),
        "--cache-dir",
        str(tmp_path / "c"),
        "--summary-json",
        str(summary_json),
    ]
    assert _cli(argv) == 0
    s = json.loads(summary_json.read_text())
    prompt, completion = sum(p for p, _ in seen), sum(c for _, c in seen)
    assert len(seen) == 4 and s["requests"] == 4 and s["replies_without_usage"] == 1
    assert (s["prompt_tokens"], s["completion_tokens"]) == (prompt, completion)
    assert s["cost"] == pytest.approx((prompt * 0.5 + completion * 2.0) / 1e6) and s["currency"] == "EUR"
    out = capsys.readouterr().out
    assert f"prompt {prompt}, completion {completion}, total {prompt + completion}" in out
    assert f"cost {s['cost']:.4f} EUR" in out and "1 replies without usage" in out


# --- 6. stray braces in prompt templates -------------------------------------------------------------


def test_stray_brace_in_a_template_is_refused_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = 'Write {n} questions. Reply as {"questions": [...]}.\n\nText:\n{chunk}'
    with pytest.raises(ValidationError) as info:
        SynthConfig.model_validate({"prompts": {"questions": bad}})
    msg = str(info.value)
    assert "prompts.questions" in msg and "stray '{'" in msg and "at character 30" in msg and "{{" in msg
    with pytest.raises(ValidationError, match=r"prompts.answer: unknown placeholder \{context\}"):
        SynthConfig.model_validate({"prompts": {"answer": "{context}\n{question}"}})
    with pytest.raises(ValidationError, match=r"judge.prompt: stray '\}'"):
        SynthConfig.model_validate({"judge": {"prompt": "{question} {answer} }"}})
    with pytest.raises(ValidationError, match=r"never uses \{chunk\}"):
        SynthConfig.model_validate({"prompts": {"questions": "Write {n} questions."}})
    # a config changed without validation is checked again before the first request
    log: list[str] = []
    doc = tmp_path / "d.md"
    doc.write_text("# A\n\nThe tank holds forty litres.\n")
    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"prompts": cfg.prompts.model_copy(update={"questions": bad})})
    with pytest.raises(ConfigError, match="stray"):
        synthesize([str(doc)], tmp_path / "o.jsonl", cfg, transport=_transport(echo_model, log))
    assert log == []
    # from the CLI: exit 2 with the message, nothing sent
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("synth:\n  prompts:\n    questions: " + json.dumps(bad) + "\n")
    assert _cli([str(doc), "--out", str(tmp_path / "o.jsonl"), "--config", str(yaml_file)]) == 2
    assert "stray '{'" in capsys.readouterr().err
    # escaped, the braces reach the model as written
    good = bad.replace('{"questions": [...]}', '{{"questions": [...]}}')
    cfg = _cfg(tmp_path, questions_per_chunk=1, prompts={"questions": "Read the text. " + good})
    synthesize([str(doc)], tmp_path / "o.jsonl", cfg, transport=_transport(echo_model, log))
    assert 'Reply as {"questions": [...]}.' in log[0]


# --- 7. repairs counted when a run resumes from the cache ----------------------------------------------


def test_repairs_of_cached_chunks_are_counted_on_resume(tmp_path: Path) -> None:
    from test_synth import DOC

    doc = tmp_path / "manual.md"
    doc.write_text(DOC, encoding="utf-8")
    cfg = {"questions_per_chunk": 3, "retries": 1}
    straight = synthesize(
        [str(doc)], tmp_path / "a.jsonl", _cfg(tmp_path / "a", **cfg), transport=httpx.MockTransport(Stub())
    )
    assert sum(straight.repairs.values()) >= 4 and straight.outputs_repaired > 0
    first = synthesize(
        [str(doc)],
        tmp_path / "b.jsonl",
        _cfg(tmp_path / "b", **cfg),
        transport=httpx.MockTransport(Stub(fail_on="shaft seal")),
    )
    assert first.chunks_skipped == 2
    resumed = synthesize(
        [str(doc)], tmp_path / "b.jsonl", _cfg(tmp_path / "b", **cfg), transport=httpx.MockTransport(Stub())
    )
    assert resumed.chunks_cached == 2
    assert resumed.repairs == straight.repairs
    assert (resumed.outputs, resumed.outputs_repaired) == (straight.outputs, straight.outputs_repaired)
    cached = synthesize(
        [str(doc)], tmp_path / "b.jsonl", _cfg(tmp_path / "b", **cfg), transport=httpx.MockTransport(Stub())
    )
    assert cached.requests == 0 and cached.repairs == straight.repairs
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


# --- 8. provenance offsets: the normalised text, for every reader ---------------------------------------


def _write_docs(tmp_path: Path) -> list[Path]:
    (tmp_path / "a.txt").write_text("Plain text about the tank.\nIt holds forty\nlitres of water.\n")
    (tmp_path / "b.md").write_text(
        "# Hose\n\nThe hose is four metres long.\n\n## Care\n\nRinse the hose after use.\n"
    )
    (tmp_path / "c.html").write_text(
        "<html><head><title>t</title></head><body><h1>Valve &amp; seat</h1>\n<p>The valve\n  seat is "
        "brass.</p><script>x()</script><h2>Wear</h2><p>The seat wears after ten years.</p></body></html>"
    )
    from fpdf import FPDF

    pdf = FPDF()
    for body in ("The filter is cleaned monthly.", "The gauge reads up to ten bar."):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.cell(0, 10, body)
    pdf.output(str(tmp_path / "d.pdf"))
    import docx

    w = docx.Document()
    w.add_heading("Motor", level=1)
    w.add_paragraph("The motor is earthed before use.")
    w.add_heading("Fuse", level=2)
    w.add_paragraph("The fuse is rated at ten amperes.")
    w.save(str(tmp_path / "e.docx"))
    return [tmp_path / n for n in ("a.txt", "b.md", "c.html", "d.pdf", "e.docx")]


def test_provenance_offsets_index_the_normalised_text_for_every_reader(tmp_path: Path) -> None:
    pytest.importorskip("fpdf")
    pytest.importorskip("docx")
    pytest.importorskip("pypdf")
    docs = _write_docs(tmp_path)
    log: list[str] = []
    out = tmp_path / "o.jsonl"
    synthesize(
        [str(d) for d in docs],
        out,
        _cfg(tmp_path, questions_per_chunk=1),
        transport=_transport(echo_model, log),
    )
    sent = {_tag(c): c for c in (_chunk_of(u) for u in log if u.startswith("Read the text"))}
    rows = _rows(out)
    assert {Path(r["provenance"]["file"]).name for r in rows} == {d.name for d in docs}
    assert len(rows) == len(sent) == 9
    for r in rows:
        p = r["provenance"]
        tag = r["messages"][0]["content"].split()[3]
        text = read_document(p["file"]).text
        assert text[p["start"] : p["end"]] == sent[tag]  # the exact chunk the model was shown
    html = next(
        r["provenance"]
        for r in rows
        if r["provenance"]["file"].endswith("c.html") and r["provenance"]["headings"] == ["Valve & seat"]
    )
    # HTML offsets are into the text (tags dropped, entities decoded, heading marks added), not the markup
    assert (
        read_document(html["file"]).text[html["start"] : html["end"]]
        == "# Valve & seat\n\nThe valve seat is brass."
    )
    pages = sorted(r["provenance"]["page"] for r in rows if r["provenance"]["file"].endswith("d.pdf"))
    assert pages == [1, 2]
