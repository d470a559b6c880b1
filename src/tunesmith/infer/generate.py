"""Generation with the model's own chat template, stopping at eos and at its end-of-turn token.

`generate_batch` samples many prompts at once (left-padded, with the KV cache), reproducibly:
the global RNG is seeded for the call and restored after it, so a caller's own random streams
(dropout, data order) are not moved by generation.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return sorted(ids)


def reply_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """`stop_token_ids` plus the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`): where a chat model's eos is another token, stopping on eos alone runs on into
    a made-up next turn. The end-of-turn token is the one the export carries and checks."""
    from tunesmith.export.verify import end_of_turn_id

    ids = set(stop_token_ids(model, tokenizer))
    if getattr(tokenizer, "chat_template", None):
        eot = end_of_turn_id(tokenizer, None)
        if eot is not None:
            ids.add(int(eot))
    return sorted(ids)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def generation_kwargs(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": reply_stop_ids(model, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=0.95)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate_reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> str:
    ids = prompt_ids(tokenizer, messages).to(model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **generation_kwargs(model, tokenizer, max_new_tokens, temperature),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def stream_reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    ids = prompt_ids(tokenizer, messages).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        streamer=streamer,
        **generation_kwargs(model, tokenizer, max_new_tokens, temperature),
    )
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs), daemon=True)
    worker.start()
    yield from streamer
    worker.join()


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with each prompt padded on the left, so all rows end where
    generation starts (the model's position ids then come from the mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The CPU RNG and `device`'s, seeded with `seed` inside, restored to their state outside."""
    accelerated = device.type != "cpu"
    devices = [device.index if device.index is not None else 0] if accelerated else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerated else None):
        torch.random.default_generator.manual_seed(seed)
        if accelerated:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


def trim_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first stop token, and whether there was one."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[: i + 1]), True
    return list(tokens), False


@torch.no_grad()
def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[tuple[list[int], bool]]:
    """Each prompt's new tokens (through its first stop token) and whether it stopped.

    temperature > 0 samples from softmax(logits / temperature) cut to the top-p nucleus, nothing
    else (no top-k); 0 is greedy. Settings not given here come from `model.generation_config`.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(prompts, pad_id)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_p=top_p if sampling else 1.0,
        top_k=0,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    with seeded_rng(seed, device):
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
    new = out[:, input_ids.shape[1] :].tolist()
    return [trim_at_stop(row, stop_ids) for row in new]
