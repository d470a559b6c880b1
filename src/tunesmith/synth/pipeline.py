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
from pydantic import ValidationError

from tunesmith.config.load import ConfigError
from tunesmith.synth.cache import ChunkCache, digest
from tunesmith.synth.chunking import Chunk, chunk_by_headings, chunk_by_tokens, token_counter
from tunesmith.synth.client import ChatClient, ClientError, Reply
from tunesmith.synth.config import SynthConfig
from tunesmith.synth.filters import Row, apply_filters
from tunesmith.synth.output import write_jsonl
from tunesmith.synth.parse import Parsed, parse_answer, parse_questions, parse_score
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
    """Repairs behind every chunk of this output, cached chunks included (what the data needed)."""
    outputs: int = 0
    """Usable model outputs behind this output (questions, answers, judge scores), cached ones included."""
    outputs_repaired: int = 0
    judged: int = 0
    prompt_tokens: int = 0
    """Tokens of this run's requests, summed from the replies' `usage` (cached chunks cost nothing)."""
    completion_tokens: int = 0
    replies_without_usage: int = 0
    cost: float | None = None
    currency: str | None = None
    seconds: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Chunks or questions given up on: {"file", "chunk", "question"?, "reason"}."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def text(self) -> str:
        tokens = (
            f"tokens: prompt {self.prompt_tokens}, completion {self.completion_tokens}, "
            f"total {self.prompt_tokens + self.completion_tokens}"
        )
        if self.cost is not None:
            tokens += f"; cost {self.cost:.4f} {self.currency}"
        if self.replies_without_usage:
            tokens += f" ({self.replies_without_usage} replies without usage, not counted)"
        lines = [
            f"documents {self.documents}, chunks {self.chunks} ({self.chunks_cached} from cache, "
            f"{self.chunks_skipped} skipped), requests {self.requests} ({self.retries} retries)",
            f"rows kept {self.rows_kept} of {self.rows_generated}; removed: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.removed.items())) or "none")
            + (f"; {self.judged} judged" if self.judged else ""),
            f"{tokens}; repairs {sum(self.repairs.values())} "
            f"({self.outputs_repaired} of {self.outputs} outputs); {self.seconds:.1f} s",
        ]
        lines += [f"skipped {s['file']} chunk {s['chunk']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def _prompt_hash(cfg: SynthConfig) -> str:
    keys: dict[str, Any] = {
        "prompts": cfg.prompts.model_dump(exclude={"reasoning"}),
        "n": cfg.questions_per_chunk,
        "model": cfg.model,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }
    if cfg.reasoning != "off":  # keep and strip send the same requests: one cache serves both
        keys["reasoning"] = cfg.prompts.reasoning
    return digest(json.dumps(keys, sort_keys=True))


def _judge_hash(cfg: SynthConfig) -> str:
    assert cfg.judge is not None
    judge = cfg.judge.model_dump(exclude={"threshold"})  # a new threshold reuses the scores
    return digest(
        json.dumps({"judge": judge, "model": cfg.model, "system": cfg.prompts.system}, sort_keys=True)
    )


class _Tally:
    """Repairs and outputs of one chunk (or one judged pair), stored with it in the cache."""

    def __init__(self) -> None:
        self.repairs: Counter[str] = Counter()
        self.outputs = 0
        self.repaired = 0

    def add(self, parsed: Parsed) -> None:
        self.outputs += 1
        self.repaired += bool(parsed.repairs)
        self.repairs.update(parsed.repairs)

    def as_dict(self) -> dict[str, Any]:
        return {"repairs": dict(self.repairs), "outputs": self.outputs, "repaired": self.repaired}


class _Run:
    def __init__(self, cfg: SynthConfig, client: ChatClient) -> None:
        self.cfg, self.client = cfg, client

    def _messages(self, user: str) -> list[dict[str, str]]:
        system = self.cfg.prompts.system
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]

    async def _ask(
        self,
        prompt: str,
        parse: Callable[[Reply], Parsed],
        tally: _Tally,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Parsed:
        """Ask, parse, and ask again (up to `parse_retries` times) while the output is unusable."""
        result = Parsed(error="not asked")
        for _ in range(self.cfg.parse_retries + 1):
            reply = await self.client.chat(
                self._messages(prompt),
                temperature=self.cfg.temperature if temperature is None else temperature,
                max_tokens=max_tokens or self.cfg.max_tokens,
            )
            result = parse(reply)
            if result.error is None:
                tally.add(result)
                return result
        return result

    async def chunk(self, chunk: Chunk) -> dict[str, Any]:
        """The chunk's question-answer pairs and the questions given up on, as stored in the cache."""
        n, tally = self.cfg.questions_per_chunk, _Tally()
        want_reasoning = self.cfg.reasoning != "off"
        prompt = self.cfg.prompts.questions.format(n=n, chunk=chunk.text)
        qs = await self._ask(
            prompt, lambda r: parse_questions(r.text, n, prompt, r.finish_reason == "length"), tally
        )
        if qs.error is not None:
            return {"pairs": [], "skipped": [{"reason": qs.error}], "failed": True, **tally.as_dict()}

        async def answer(q: str) -> tuple[str, Parsed]:
            p = self.cfg.prompts.answer.format(chunk=chunk.text, question=q)
            if want_reasoning:
                p += "\n\n" + self.cfg.prompts.reasoning

            def parse(r: Reply) -> Parsed:
                cut = r.finish_reason == "length"
                return parse_answer(r.text, q, cut, want_reasoning=want_reasoning, reasoning=r.reasoning)

            return q, await self._ask(p, parse, tally)

        pairs, skipped = [], []
        for q, a in await asyncio.gather(*(answer(q) for q in qs.value)):
            if a.error is None:
                pairs.append([q, a.value, a.reasoning])
            else:
                skipped.append({"question": q, "reason": a.error})
        return {"pairs": pairs, "skipped": skipped, "failed": False, **tally.as_dict()}

    async def judge(self, row: Row) -> dict[str, Any]:
        """{"score"} or {"error"} for one pair, with its tally, as stored in the cache."""
        judge, tally = self.cfg.judge, _Tally()
        assert judge is not None
        prompt = judge.prompt.format(chunk=row.chunk_text, question=row.question, answer=row.answer)
        got = await self._ask(
            prompt,
            lambda r: parse_score(r.text, judge.scale),
            tally,
            temperature=judge.temperature,
            max_tokens=judge.max_tokens,
        )
        return ({"score": got.value} if got.error is None else {"error": got.error}) | tally.as_dict()


def _validated(cfg: SynthConfig) -> SynthConfig:
    """Checked again before any request: a config changed with `model_copy(update=...)` skipped validation."""
    try:
        return SynthConfig.model_validate(cfg.model_dump())
    except ValidationError as exc:
        raise ConfigError(f"synth config: {exc}") from None


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
    cfg = _validated(cfg)
    cache = ChunkCache(cfg.cache_dir or f"{out}.cache")
    prompt_hash = _prompt_hash(cfg)
    work: list[tuple[Chunk, str]] = []
    ch = cfg.chunking
    if ch.mode == "tokens" and count_tokens is None:
        count_tokens = token_counter(ch.tokenizer)
    for path in resolve_documents(docs):
        doc = read_document(path)
        summary.documents += 1
        if ch.mode == "tokens":
            assert count_tokens is not None
            chunks = chunk_by_tokens(doc, count_tokens, ch.max_tokens, ch.overlap)
        else:
            chunks = chunk_by_headings(doc, ch.max_chars)
        doc_hash = digest(doc.text, ch.model_dump_json())
        work += [(c, doc_hash) for c in chunks]
    summary.chunks = len(work)
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
    run = _Run(cfg, client)
    repairs: Counter[str] = Counter()

    def tally(result: dict[str, Any]) -> None:
        repairs.update(result.get("repairs") or {})
        summary.outputs += int(result.get("outputs") or 0)
        summary.outputs_repaired += int(result.get("repaired") or 0)

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
        rows: list[Row] = []
        for (chunk, _), result in zip(work, results, strict=True):
            tally(result)
            summary.chunks_skipped += bool(result["failed"])
            for s in result["skipped"]:
                summary.skipped.append({"file": chunk.doc, "chunk": chunk.index, **s})
            for q, a, *rest in result["pairs"]:  # entries cached before reasoning existed have two items
                rows.append(Row(q, a, chunk.text, chunk.provenance(), rest[0] if rest else None))
        kept, removed = apply_filters(rows, cfg.filters)
        if cfg.judge is not None:
            kept = await _judge_rows(run, cache, kept, removed, summary, tally)
    finally:
        await client.aclose()
    write_jsonl(kept, cfg.format, out, cfg.reasoning)
    c = client.counts
    summary.requests, summary.retries = c.requests, c.retries
    summary.prompt_tokens, summary.completion_tokens = c.prompt_tokens, c.completion_tokens
    summary.replies_without_usage = c.replies_without_usage
    if cfg.prices is not None:
        p = cfg.prices
        summary.cost = (c.prompt_tokens * p.prompt + c.completion_tokens * p.completion) / 1e6
        summary.currency = p.currency
    summary.rows_generated, summary.rows_kept = len(rows), len(kept)
    summary.removed, summary.repairs = dict(removed), dict(repairs)
    summary.seconds = time.perf_counter() - t0
    return summary


async def _judge_rows(
    run: _Run,
    cache: ChunkCache,
    rows: list[Row],
    removed: Counter[str],
    summary: Summary,
    tally: Callable[[dict[str, Any]], None],
) -> list[Row]:
    """Rows the judge scored at or above the threshold; the rest counted as `judge` (or `judge_unrated`)."""
    judge = run.cfg.judge
    assert judge is not None
    judge_hash = _judge_hash(run.cfg)

    async def one(row: Row) -> dict[str, Any]:
        key = digest(row.question, row.answer, row.reasoning or "", row.chunk_text)
        cached = cache.get(key, 0, judge_hash)
        if cached is not None:
            return cached
        try:
            result = await run.judge(row)
        except ClientError as exc:  # not cached: asked again next time
            return {"error": str(exc)}
        cache.put(key, 0, judge_hash, result)
        return result

    kept = []
    for row, result in zip(rows, await asyncio.gather(*(one(r) for r in rows)), strict=True):
        tally(result)
        if "score" not in result:
            removed["judge_unrated"] += 1
            summary.skipped.append(
                {
                    "file": row.provenance["file"],
                    "chunk": row.provenance["chunk"],
                    "question": row.question,
                    "reason": f"judge: {result['error']}",
                }
            )
            continue
        summary.judged += 1
        if result["score"] >= judge.threshold:
            kept.append(row)
        else:
            removed["judge"] += 1
    return kept


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
