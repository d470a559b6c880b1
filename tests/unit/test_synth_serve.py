"""tunesmith synth against the real `tunesmith serve` app on the default model (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pypdf")
pytest.importorskip("fpdf")

MD = """# Pump manual

## Priming

The pump must be primed with water before the first start. Priming removes air from the casing.

## Maintenance

The shaft seal is replaced every two years. The bearings are greased every 500 operating hours.
"""


class Counting:
    """ASGI wrapper that records the body of every chat request the server receives."""

    def __init__(self, app: Any) -> None:
        self.app, self.bodies = app, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        self.bodies.append(json.loads(body))
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


@pytest.mark.slow
def test_default_model_server_builds_a_dataset_that_checks_and_resumes(tmp_path: Path) -> None:
    from fpdf import FPDF

    from tunesmith.data.validate import read_samples
    from tunesmith.serve.adapters import load_model_set
    from tunesmith.serve.app import create_app
    from tunesmith.serve.engine import Engine
    from tunesmith.serve.server import ServerThread
    from tunesmith.synth.config import SynthConfig
    from tunesmith.synth.pipeline import synthesize
    from tunesmith.synth.readers import read_document

    md = tmp_path / "pump.md"
    md.write_text(MD, encoding="utf-8")
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for body in (
        "The inlet valve opens at two bar of pressure.",
        "The motor must be earthed before it runs.",
    ):
        pdf.add_page()
        pdf.multi_cell(0, 8, body)
    pdf.output(str(tmp_path / "plant.pdf"))

    models = load_model_set("default")
    engine = Engine(models.model, max_context=models.context_length, max_batch=8)
    app = Counting(create_app(engine, models))
    server = ServerThread(app).start()
    try:
        name = next(iter(models.served))
        cfg = SynthConfig(
            endpoint=f"{server.url}/v1",
            model=name,
            temperature=0,
            max_tokens=160,
            cache_dir=str(tmp_path / "cache"),
            filters={"min_grounding": 0.3},
        )
        out = tmp_path / "data.jsonl"
        first = synthesize([str(md)], out, cfg)  # the run "stops" after the Markdown file
        assert first.chunks == 2 and first.requests == len(app.bodies) > 0
        app.bodies.clear()
        second = synthesize([str(md), str(tmp_path / "plant.pdf")], out, cfg)
        assert second.chunks_cached == 2 and second.chunks == 4
        assert app.bodies and all(
            "bar of pressure" in b["messages"][-1]["content"] or "earthed" in b["messages"][-1]["content"]
            for b in app.bodies
        )
        app.bodies.clear()
        third = synthesize([str(md), str(tmp_path / "plant.pdf")], out, cfg)
        assert app.bodies == [] and third.requests == 0
    finally:
        server.stop()
        engine.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows, second.text()
    assert read_samples(str(out), "auto", "raise").rows_read == len(rows)
    texts = {p: read_document(p).text for p in (str(md), str(tmp_path / "plant.pdf"))}
    for row in rows:
        p = row["provenance"]
        span = texts[p["file"]][p["start"] : p["end"]]
        assert span.strip() and (p["page"] is None) == p["file"].endswith(".md")
