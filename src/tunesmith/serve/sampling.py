"""Per-request sampling: greedy at temperature 0, otherwise temperature + top-p from the request's own RNG.

Each request owns a `torch.Generator`, so a seeded request draws the same tokens whichever other
requests share its batch; the batch only decides which rows are computed together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler; validated by the caller (the HTTP layer or `chat`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Sampled:
    """One chosen token, with its log-probability under the model (before temperature) when asked."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for this request: seeded for reproducibility, or from fresh entropy."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Sampled:
    """Choose the next token from one row of fp32 logits `[vocab]`."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            probs = _top_p(probs, params.top_p)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    if not params.logprobs:
        return Sampled(token)
    logprobs = torch.log_softmax(logits, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs > 0:
        values, ids = torch.topk(logprobs, params.top_logprobs)
        top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return Sampled(token, float(logprobs[token]), top)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()
