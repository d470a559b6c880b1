"""`SynthConfig`: every setting of a synth run, typed and validated, so a run is reproducible from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

QUESTIONS_PROMPT = (
    "Read the text below and write {n} questions that it answers. Each question must stand on its "
    'own and be answerable from the text alone. Reply with only a JSON list of strings, like ["...?"].'
    "\n\nText:\n{chunk}"
)
ANSWER_PROMPT = (
    "Answer the question using only the text below. Reply with the answer only.\n\n"
    "Text:\n{chunk}\n\nQuestion: {question}"
)
SYSTEM_PROMPT = "You write accurate training data from documents."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Chunking(_Section):
    mode: Literal["headings", "tokens"] = "headings"
    max_chars: PositiveInt = Field(default=2000, description="size cap of a chunk in headings mode")
    max_tokens: PositiveInt = Field(default=512, description="size of a chunk in tokens mode")
    overlap: int = Field(default=64, ge=0, description="tokens shared by neighbouring chunks (tokens mode)")


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
    prompts: Prompts = Prompts()
    filters: Filters = Filters()
    cache_dir: str | None = Field(default=None, description="default: <out>.cache next to the output")


def load_synth_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SynthConfig:
    """The `synth:` section of a YAML file (or defaults), with flag values laid over it."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("synth", {}), dict):
            raise ValueError(f"{path}: expected a mapping with a top-level `synth:` section")
        data = dict(raw.get("synth") or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return SynthConfig.model_validate(data)
