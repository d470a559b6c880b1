"""One synth run: documents -> chunks -> questions -> answers -> filters -> JSONL and a summary."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tunesmith.synth.cache import ChunkCache, digest
from tunesmith.synth.chunking import Chunk, chunk_by_headings, chunk_by_tokens
from tunesmith.synth.client import ChatClient, ClientError
from tunesmith.synth.config import SynthConfig
from tunesmith.synth.filters import Row, apply_filters
from tunesmith.synth.output import write_jsonl
from tunesmith.synth.parse import Parsed, parse_answer, parse_questions
from tunesmith.synth.readers import read_document, resolve_documents


@dataclass
class Summary:
    documents: int = 0
    chunks: int = 0
    chunks_cached: int = 0
    chunks_skipped: int = 0
    requests: int = 0
    retries: int = 0
    rows_generated: int = 0
    rows_kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Chunks or questions given up on: {"file", "chunk", "question"?, "reason"}."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def text(self) -> str:
        lines = [
            f"documents {self.documents}, chunks {self.chunks} ({self.chunks_cached} from cache, "
            f"{self.chunks_skipped} skipped), requests {self.requests} ({self.retries} retries)",
            f"rows kept {self.rows_kept} of {self.rows_generated}; removed: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.removed.items())) or "none"),
            f"tokens: prompt {self.prompt_tokens}, completion {self.completion_tokens}; "
            f"repairs {sum(self.repairs.values())}; {self.seconds:.1f} s",
        ]
        lines += [f"skipped {s['file']} chunk {s['chunk']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def _prompt_hash(cfg: SynthConfig) -> str:
    keys = {
        "prompts": cfg.prompts.model_dump(),
        "n": cfg.questions_per_chunk,
        "model": cfg.model,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    return digest(json.dumps(keys, sort_keys=True))


class _Run:
    def __init__(self, cfg: SynthConfig, client: ChatClient, summary: Summary) -> None:
        self.cfg, self.client, self.summary = cfg, client, summary
        self.repairs: Counter[str] = Counter()

    def _messages(self, user: str) -> list[dict[str, str]]:
        system = self.cfg.prompts.system
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]

    async def _ask(self, prompt: str, parse: Callable[[str, bool], Parsed]) -> Parsed:
        """Ask, parse, and ask again (up to `parse_retries` times) while the output is unusable."""
        result = Parsed(error="not asked")
        for _ in range(self.cfg.parse_retries + 1):
            reply = await self.client.chat(
                self._messages(prompt), temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens
            )
            result = parse(reply.text, reply.finish_reason == "length")
            if result.error is None:
                self.repairs.update(result.repairs)
                return result
        return result

    async def chunk(self, chunk: Chunk) -> dict[str, Any]:
        """The chunk's question-answer pairs and the questions given up on, as stored in the cache."""
        n = self.cfg.questions_per_chunk
        prompt = self.cfg.prompts.questions.format(n=n, chunk=chunk.text)
        qs = await self._ask(prompt, lambda t, cut: parse_questions(t, n, prompt, cut))
        if qs.error is not None:
            return {"pairs": [], "skipped": [{"reason": qs.error}], "failed": True}

        async def answer(q: str) -> tuple[str, Parsed]:
            p = self.cfg.prompts.answer.format(chunk=chunk.text, question=q)
            return q, await self._ask(p, lambda t, cut: parse_answer(t, q, cut))

        pairs, skipped = [], []
        for q, a in await asyncio.gather(*(answer(q) for q in qs.value)):
            if a.error is None:
                pairs.append([q, a.value])
            else:
                skipped.append({"question": q, "reason": a.error})
        return {"pairs": pairs, "skipped": skipped, "failed": False}


async def _run_async(
    docs: list[str],
    out: str,
    cfg: SynthConfig,
    *,
    api_key: str | None,
    transport: httpx.AsyncBaseTransport | None,
    count_tokens: Callable[[str], int] | None,
) -> Summary:
    summary, t0 = Summary(), time.perf_counter()
    cache = ChunkCache(cfg.cache_dir or f"{out}.cache")
    prompt_hash = _prompt_hash(cfg)
    client = ChatClient(
        cfg.endpoint,
        cfg.model,
        api_key=api_key,
        concurrency=cfg.concurrency,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        timeout_s=cfg.timeout_s,
        transport=transport,
    )
    run = _Run(cfg, client, summary)
    work: list[tuple[Chunk, str]] = []
    for path in resolve_documents(docs):
        doc = read_document(path)
        summary.documents += 1
        ch = cfg.chunking
        if ch.mode == "tokens":
            counter = count_tokens or (lambda s: len(s.split()))
            chunks = chunk_by_tokens(doc, counter, ch.max_tokens, ch.overlap)
        else:
            chunks = chunk_by_headings(doc, ch.max_chars)
        doc_hash = digest(doc.text, ch.model_dump_json())
        work += [(c, doc_hash) for c in chunks]
    summary.chunks = len(work)

    async def one(chunk: Chunk, doc_hash: str) -> dict[str, Any]:
        cached = cache.get(doc_hash, chunk.index, prompt_hash)
        if cached is not None:
            summary.chunks_cached += 1
            return cached
        try:
            result = await run.chunk(chunk)
        except ClientError as exc:  # not cached: a later run tries this chunk again
            return {"pairs": [], "skipped": [{"reason": str(exc)}], "failed": True}
        cache.put(doc_hash, chunk.index, prompt_hash, result)
        return result

    try:
        results = await asyncio.gather(*(one(c, h) for c, h in work))
    finally:
        await client.aclose()
    rows: list[Row] = []
    for (chunk, _), result in zip(work, results, strict=True):
        summary.chunks_skipped += bool(result["failed"])
        for s in result["skipped"]:
            summary.skipped.append({"file": chunk.doc, "chunk": chunk.index, **s})
        rows += [Row(q, a, chunk.text, chunk.provenance()) for q, a in result["pairs"]]
    kept, removed = apply_filters(rows, cfg.filters)
    write_jsonl(kept, cfg.format, out)
    c = client.counts
    summary.requests, summary.retries = c.requests, c.retries
    summary.prompt_tokens, summary.completion_tokens = c.prompt_tokens, c.completion_tokens
    summary.rows_generated, summary.rows_kept = len(rows), len(kept)
    summary.removed, summary.repairs = dict(removed), dict(run.repairs)
    summary.seconds = time.perf_counter() - t0
    return summary


def synthesize(
    docs: list[str],
    out: str | Path,
    cfg: SynthConfig,
    *,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> Summary:
    """Run the whole pipeline; `transport` lets tests answer requests in-process."""
    return asyncio.run(
        _run_async(list(docs), str(out), cfg, api_key=api_key, transport=transport, count_tokens=count_tokens)
    )
