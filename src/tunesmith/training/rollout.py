"""GRPO's rollouts: completions sampled from the live policy, in the middle of training.

The model as trained cannot generate: its packed attention kernel (`tunesmith_varlen`) finds a
sample's keys from the query's own position ids, so under a KV cache a one-token decode step
would attend to one key. `generation_mode` therefore sets the same weights up for `generate`
(no copy of the model): the DDP/FSDP wrapper off (generation must not take part in gradient
synchronisation), a kernel that is safe under a cache (sdpa; eager for soft-capped models),
activation checkpointing off, eval mode (dropout off), the model's own generation defaults set
aside (a repetition penalty or top-k from its generation_config.json would change the
distribution the loss assumes); and every one of those back as it was on the way out.

Sampling is seeded by (train.seed, which data split, micro-batch index) alone, and the global
RNG is restored after it, so a resumed run samples exactly the completions the uninterrupted run
did, and training's own random streams do not move.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from tunesmith.infer.generate import generate_batch
from tunesmith.models.attention import generation_attention


def causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the module to call `generate` on, the transformers model under it), through DDP, the
    loss wrapper (`CausalLMWithLoss.model`) and PEFT."""
    from accelerate.utils import extract_model_from_parallel

    lm = extract_model_from_parallel(model)
    lm = getattr(lm, "model", lm) if not hasattr(lm, "generate") else lm
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return lm, base


@contextlib.contextmanager
def generation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The policy ready for `generate` inside, exactly as it was outside (see the module docstring)."""
    from transformers import GenerationConfig

    lm, base = causal_lm(model)
    attention = base.config._attn_implementation
    safe = generation_attention(attention, base.config)
    checkpointed = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    training = [(m, m.training) for m in model.modules()]
    own_defaults = base.generation_config
    try:
        if safe != attention:
            base.set_attn_implementation(safe)
            if base.config._attn_implementation != safe:
                raise RuntimeError(
                    f"{type(base).__name__} cannot switch its attention from {attention} to {safe} for "
                    "generation; set train.attention: sdpa for GRPO with this model"
                )
        for module in checkpointed:
            module.gradient_checkpointing = False
        base.generation_config = GenerationConfig()
        model.eval()
        yield lm
    finally:
        for module, mode in training:
            module.train(mode)
        base.generation_config = own_defaults
        for module in checkpointed:
            module.gradient_checkpointing = True
        if base.config._attn_implementation != attention:
            base.set_attn_implementation(attention)


def rollout_seed(seed: int, split: str, index: int) -> int:
    """The sampling seed of micro-batch `index` of `split` ("train" or "eval") under train.seed."""
    digest = hashlib.sha256(f"tunesmith-grpo:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Completions:
    """`num_generations` completions per prompt, each prompt's group side by side."""

    prompt_ids: list[list[int]]
    """The prompt of each completion (each prompt repeated once per completion)."""
    completion_ids: list[list[int]]
    """Generated tokens, through the stop token where one was generated."""
    stopped: list[bool]
    """Whether each completion ended with a stop token (False: cut at max_completion_length)."""


def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop_ids: Sequence[int],
    pad_id: int,
) -> Completions:
    """Sample every prompt's group from the live policy in one batched, cached `generate`.

    temperature 0 is greedy (for tests and evaluation); otherwise softmax(logits / temperature)
    within the top-p nucleus.
    """
    repeated = [list(p) for p in prompts for _ in range(num_generations)]
    with generation_mode(model) as lm:
        out = generate_batch(
            lm,
            repeated,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
    return Completions(repeated, [ids for ids, _ in out], [stopped for _, stopped in out])


def stop_ids_of(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the model's and the tokenizer's end-of-sequence ids."""
    from tunesmith.infer.generate import stop_token_ids

    _, base = causal_lm(model)
    ids = stop_token_ids(base, tokenizer)
    if not ids:
        raise ValueError(
            "GRPO: neither the model's generation_config nor the tokenizer names an end-of-sequence token, so "
            "completions could never stop; set eos_token_id in the model's generation_config.json"
        )
    return ids
