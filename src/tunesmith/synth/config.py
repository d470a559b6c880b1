"""`SynthConfig`: every setting of a synth run, typed and validated, so a run is reproducible from a file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

QUESTIONS_PROMPT = (
    "Read the text below and write {n} questions that it answers. Each question must stand on its "
    'own and be answerable from the text alone. Reply with only a JSON list of strings, like ["...?"].'
    "\n\nText:\n{chunk}"
)
ANSWER_PROMPT = (
    "Answer the question using only the text below. Reply with the answer only.\n\n"
    "Text:\n{chunk}\n\nQuestion: {question}"
)
REASONING_PROMPT = (
    "Before the answer, reason step by step inside <think> and </think>; after </think>, write the answer."
)
JUDGE_PROMPT = (
    "Rate the answer to the question below from 1 (wrong or not supported by the text) to 5 (correct, "
    "complete and supported by the text). Reply with the number only.\n\n"
    "Text:\n{chunk}\n\nQuestion: {question}\n\nAnswer: {answer}"
)
SYSTEM_PROMPT = "You write accurate training data from documents."

_BRACE = re.compile(r"\{\{|\}\}|\{(\w*)\}|[{}]")


def check_template(key: str, template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """Refuse a template that `str.format` would fail on or fill wrongly, naming the brace and the fix."""
    seen: set[str] = set()
    names = ", ".join("{" + a + "}" for a in allowed)
    for m in _BRACE.finditer(template):
        token = m.group(0)
        if token in ("{{", "}}"):
            continue
        if m.group(1) in allowed:
            seen.add(m.group(1))
            continue
        near = template[max(0, m.start() - 25) : m.end() + 25]
        what = f"unknown placeholder {token}" if m.group(1) else f"stray {token!r}"
        raise ValueError(
            f"{key}: {what} at character {m.start()} (in {near!r}); the placeholders of this template "
            f"are {names}: write {{{{ and }}}} for a literal brace (e.g. '{{{{\"questions\": [...]}}}}')"
        )
    missing = [r for r in required if r not in seen]
    if missing:
        raise ValueError(
            f"{key}: the template never uses {', '.join('{' + r + '}' for r in missing)}, "
            f"so the model would not see it; add it (placeholders: {names})"
        )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Chunking(_Section):
    mode: Literal["headings", "tokens"] = "headings"
    max_chars: PositiveInt = Field(default=2000, description="size cap of a chunk in headings mode")
    max_tokens: PositiveInt = Field(default=512, description="size of a chunk in tokens mode")
    overlap: int = Field(default=64, ge=0, description="tokens shared by neighbouring chunks (tokens mode)")
    tokenizer: str | None = Field(
        default=None,
        description="tokens mode: 'default' (the default model's tokenizer) or a model/tokenizer folder; "
        "None counts whitespace-separated words",
    )


class Filters(_Section):
    near_dup_threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="shingle Jaccard at or above which a question is a near duplicate",
    )
    min_grounding: float = Field(
        default=0.5, ge=0, le=1, description="fraction of an answer's words that must occur in its chunk"
    )
    min_question_chars: int = Field(default=8, ge=0)
    max_question_chars: PositiveInt = 500
    min_answer_chars: int = Field(default=1, ge=0)
    max_answer_chars: PositiveInt = 4000


class Prompts(_Section):
    system: str = SYSTEM_PROMPT
    questions: str = Field(default=QUESTIONS_PROMPT, description="placeholders: {n}, {chunk}")
    answer: str = Field(default=ANSWER_PROMPT, description="placeholders: {chunk}, {question}")
    reasoning: str = Field(
        default=REASONING_PROMPT,
        description="appended to the answer prompt when `reasoning` is keep or strip (plain text, not a template)",
    )

    @model_validator(mode="after")
    def _templates_format(self) -> Prompts:
        check_template("prompts.questions", self.questions, ("n", "chunk"), ("chunk",))
        check_template("prompts.answer", self.answer, ("chunk", "question"), ("question",))
        return self


class Judge(_Section):
    """A second request per pair that rates it; pairs under `threshold` are removed (counted as `judge`)."""

    prompt: str = Field(default=JUDGE_PROMPT, description="placeholders: {chunk}, {question}, {answer}")
    threshold: float = Field(default=4.0, description="lowest score kept")
    scale: PositiveInt = Field(default=5, description="highest score; a reply outside 1..scale is unusable")
    max_tokens: PositiveInt = 16
    temperature: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _template_formats(self) -> Judge:
        check_template("judge.prompt", self.prompt, ("chunk", "question", "answer"), ("question", "answer"))
        if not 1 <= self.threshold <= self.scale:
            raise ValueError(f"judge.threshold ({self.threshold}) must lie in 1..judge.scale ({self.scale})")
        return self


class Prices(_Section):
    """Price per million tokens, to print what a run cost (hosted APIs bill prompt and completion apart)."""

    prompt: float = Field(ge=0, description="per million prompt tokens")
    completion: float = Field(ge=0, description="per million completion tokens")
    currency: str = "USD"


class SynthConfig(_Section):
    endpoint: str = Field(
        default="http://127.0.0.1:8000/v1", description="base URL of an OpenAI-compatible API"
    )
    model: str = "default"
    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    format: Literal["openai", "sharegpt", "alpaca"] = "openai"
    questions_per_chunk: PositiveInt = 3
    chunking: Chunking = Chunking()
    concurrency: PositiveInt = 4
    retries: int = Field(default=3, ge=0, description="retries of a failed request (429, 5xx, timeout)")
    parse_retries: int = Field(default=2, ge=0, description="new requests when an output cannot be repaired")
    backoff_s: float = Field(default=1.0, ge=0, description="first backoff; doubled on each retry")
    timeout_s: float = Field(default=120.0, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: PositiveInt = 512
    reasoning: Literal["off", "keep", "strip"] = Field(
        default="off",
        description="keep/strip: ask for a <think> block before each answer; keep writes it into the "
        "assistant turn (data.reasoning then trains or strips it), strip leaves the answer only",
    )
    prompts: Prompts = Prompts()
    filters: Filters = Filters()
    judge: Judge | None = Field(default=None, description="rate each kept pair with a second request")
    prices: Prices | None = Field(default=None, description="prices per million tokens, for a cost figure")
    cache_dir: str | None = Field(default=None, description="default: <out>.cache next to the output")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = _merge(out.get(k) or {}, v)
            if not v:
                continue
        out[k] = v
    return out


def load_synth_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SynthConfig:
    """The `synth:` section of a YAML file (or defaults), with flag values (None: not given) laid over it."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("synth", {}), dict):
            raise ValueError(f"{path}: expected a mapping with a top-level `synth:` section")
        data = dict(raw.get("synth") or {})
    return SynthConfig.model_validate(_merge(data, overrides or {}))
