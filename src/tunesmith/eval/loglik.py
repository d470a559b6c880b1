"""Log-likelihood of continuations: `(context, continuation)` -> (sum of log-probs, is_greedy).

Tokenization follows lm-evaluation-harness's HF backend exactly (`TemplateLM._encode_pair`,
`HFLM.tok_encode`, `HFLM._loglikelihood_tokens`), so the numbers agree with the harness:
trailing whitespace of the context moves onto the continuation; context + continuation is encoded
whole and the continuation is its tail after the separately encoded context; the tokenizer's own
special-token default applies (no BOS unless the tokenizer adds one), except that a string already
starting with the BOS text gets none; an empty context becomes the BOS (else EOS) token; inputs
longer than the model's window lose tokens from the left.

Scoring is padding-free and shares work:
- every distinct forward input (`(context + continuation)[:-1]`) runs once; choices that are one
  token long share their context's input, so the logits at the last context position score all of
  them at once (MMLU's " A".." D": one forward per question);
- those inputs are packed end to end into rows of up to `batch_tokens` tokens, with position ids
  restarting per sample and a varlen attention kernel, so samples in a row never attend to each
  other (plain sdpa would let them: see `models/varlen_attention.py`);
- inputs that share a long leading run of tokens (the description and shots of a few-shot prompt,
  or the context of choices several tokens long) run that run once; its KV cache, expanded over
  them, serves every input's remainder in right-padded batches (attention then runs under
  sdpa/eager, exact under a cache; the model's kernel is restored afterwards). The shared run is
  found on the token sequences themselves, so it never changes what is scored.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
"""lm-eval's fallback window when neither the config nor the tokenizer names one."""

_TOKENIZER_INFINITY = 1000000000000000019884624838656

MIN_SHARED = 32
"""Inputs sharing at least this many leading tokens (a few-shot prompt) run them once, as a KV cache."""


@dataclass(frozen=True)
class Request:
    """One scored pair in tokens: the model sees `inputs`; the last `len(targets)` positions of
    `inputs` predict `targets` (the continuation's tokens)."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]


def model_max_length(model: Any, tokenizer: Any) -> int:
    """The window lm-eval's HF backend assumes (`resolve_max_length`)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer: Any) -> int:
    """BOS, else EOS: what an empty context is replaced by."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """`HFLM.tok_encode`: the tokenizer's default special tokens, none when `text` starts with BOS."""
    kwargs: dict[str, bool] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None:
        bos_text = tokenizer.decode(prefix_token_id(tokenizer))
        if bos_text and text.startswith(bos_text):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's `loglikelihood` and `_encode_pair` build them."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok_encode(tokenizer, context + continuation)
    context_enc = tok_encode(tokenizer, context)
    return context_enc, whole[len(context_enc) :]


def make_request(context_enc: Sequence[int], continuation_enc: Sequence[int], max_length: int) -> Request:
    """The model input for one pair, cut from the left to the window (`_loglikelihood_tokens`)."""
    if not continuation_enc:
        raise ValueError("a continuation must hold at least one token")
    if len(continuation_enc) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation_enc)} tokens does not fit the model's window of {max_length}"
        )
    full = list(context_enc) + list(continuation_enc)
    if len(full) > max_length + 1:
        log.warning(
            "context (%d) + continuation (%d) tokens exceed the model's window (%d); cutting %d from the left",
            len(context_enc),
            len(continuation_enc),
            max_length,
            len(full) - max_length - 1,
        )
    return Request(inputs=tuple(full[-(max_length + 1) :][:-1]), targets=tuple(continuation_enc))


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_tokens: int = 8192,
    prefix_reuse: bool = True,
    min_shared: int = MIN_SHARED,
) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs, whether greedy decoding would produce it) per pair."""
    max_length = model_max_length(model, tokenizer)
    requests = [make_request(*encode_pair(tokenizer, c, k), max_length) for c, k in pairs]
    return score_requests(
        model, requests, batch_tokens=batch_tokens, prefix_reuse=prefix_reuse, min_shared=min_shared
    )


Group = tuple[tuple[int, ...], list[int]]
"""One distinct forward input and the requests read from it."""


def score_requests(
    model: Any,
    requests: Sequence[Request],
    *,
    batch_tokens: int = 8192,
    prefix_reuse: bool = True,
    min_shared: int = MIN_SHARED,
) -> list[tuple[float, bool]]:
    """Score token-level requests; `prefix_reuse=False` runs one full input per request (the reference)."""
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.inputs if prefix_reuse else (i, *req.inputs), []).append(i)
    inputs = [(key if prefix_reuse else key[1:], members) for key, members in groups.items()]
    shared, alone = shared_prefixes(requests, inputs, min_shared) if prefix_reuse else ([], inputs)
    with torch.no_grad():
        if alone:
            with attention_kernel(model, kv_cache=False):
                for row in _rows(alone, batch_tokens):
                    _score_row(model, requests, row, results)
        if shared:
            with attention_kernel(model, kv_cache=True):
                for length, members in shared:
                    _score_with_cache(model, requests, length, members, results, batch_tokens)
    return [r for r in results if r is not None]


def shared_prefixes(
    requests: Sequence[Request], inputs: list[Group], min_shared: int
) -> tuple[list[tuple[int, list[Group]]], list[Group]]:
    """Inputs that share a leading run of at least `min_shared` tokens, as (run length, inputs), and
    the rest. Sorted inputs are clustered greedily; a cluster closes where adding the next input
    would halve its shared run. The run stops before the first position any member scores."""
    clusters: list[tuple[int, list[Group]]] = []
    alone: list[Group] = []

    def close(members: list[Group], common: int) -> None:
        first_scored = min(
            len(tokens) - len(requests[i].targets) for tokens, readers in members for i in readers
        )
        length = min(common, first_scored)
        if len(members) > 1 and length >= min_shared:
            clusters.append((length, members))
        else:
            alone.extend(members)

    ordered = sorted(inputs, key=lambda item: item[0])
    current: list[Group] = []
    common = 0
    for item in ordered:
        if current:
            n = _common_length(current[0][0], item[0], common)
            if n >= min_shared and 2 * n >= common:
                current.append(item)
                common = n
                continue
            close(current, common)
        current, common = [item], len(item[0])
    if current:
        close(current, common)
    return clusters, alone


def _common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


def _rows(inputs: list[Group], batch_tokens: int) -> list[list[Group]]:
    """Inputs laid end to end in rows of up to `batch_tokens` tokens, longest first."""
    rows: list[list[Group]] = []
    width = 0
    for item in sorted(inputs, key=lambda item: -len(item[0])):
        if rows and width + len(item[0]) <= batch_tokens:
            rows[-1].append(item)
            width += len(item[0])
        else:
            rows.append([item])
            width = len(item[0])
    return rows


def _score_row(
    model: Any, requests: Sequence[Request], row: list[Group], results: list[tuple[float, bool] | None]
) -> None:
    """One packed row; logits only at the positions some request scores."""
    ids: list[int] = []
    positions: list[int] = []
    reads: list[tuple[int, int]] = []  # (request, offset of the input's last position in the row)
    for tokens, members in row:
        ids.extend(tokens)
        positions.extend(range(len(tokens)))
        reads.extend((i, len(ids) - 1) for i in members)
    keep = sorted({end - k for i, end in reads for k in range(len(requests[i].targets))})
    where = {position: n for n, position in enumerate(keep)}
    device = _device(model)
    logits = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        logits_to_keep=torch.tensor(keep, device=device),
        use_cache=False,
    ).logits[0]
    for i, end in reads:
        n = len(requests[i].targets)
        picked = [where[end - n + 1 + k] for k in range(n)]
        results[i] = _pick(torch.log_softmax(logits[picked].float(), dim=-1), requests[i].targets)


def _score_with_cache(
    model: Any,
    requests: Sequence[Request],
    length: int,
    members: list[Group],
    results: list[tuple[float, bool] | None],
    batch_tokens: int,
) -> None:
    """The shared run once; then the members' remainders in right-padded batches over its KV cache.

    Right padding is harmless: causal attention never lets a position see the ones after it.
    """
    device = _device(model)
    name = _cache_argument(model)
    out = model(
        input_ids=torch.tensor([members[0][0][:length]], device=device), use_cache=True, logits_to_keep=1
    )
    cache = getattr(out, name)
    members = sorted(members, key=lambda item: len(item[0]))  # similar lengths share a batch
    chunks: list[list[Group]] = []
    for item in members:
        width = len(item[0])  # sorted: the widest so far
        if chunks and (len(chunks[-1]) + 1) * width <= batch_tokens:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    for n, chunk in enumerate(chunks):
        chunk_cache = cache if n == len(chunks) - 1 else copy.deepcopy(cache)
        chunk_cache.batch_repeat_interleave(len(chunk))
        width = max(len(tokens) for tokens, _ in chunk) - length
        tails = torch.zeros((len(chunk), width), dtype=torch.long)
        reads: list[tuple[int, int, int]] = []  # (request, row, last position in the remainder)
        for r, (tokens, readers) in enumerate(chunk):
            rest = tokens[length:]
            tails[r, : len(rest)] = torch.tensor(rest)
            tails[r, len(rest) :] = rest[-1]
            reads.extend((i, r, len(rest) - 1) for i in readers)
        keep = sorted({end - k for i, _, end in reads for k in range(len(requests[i].targets))})
        where = {position: n for n, position in enumerate(keep)}
        positions = torch.arange(length, length + width, device=device)
        logits = model(
            input_ids=tails.to(device),
            position_ids=positions[None].expand(len(chunk), -1),
            logits_to_keep=torch.tensor(keep, device=device),
            use_cache=True,
            **{name: chunk_cache},
        ).logits
        for i, r, end in reads:
            k = len(requests[i].targets)
            picked = [where[end - k + 1 + j] for j in range(k)]
            results[i] = _pick(torch.log_softmax(logits[r, picked].float(), dim=-1), requests[i].targets)


def _pick(logprobs: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of the targets' log-probs over rows (one row per target) and whether each is the argmax."""
    index = torch.tensor(targets, device=logprobs.device)
    chosen = logprobs.gather(1, index[:, None]).squeeze(1)
    greedy = bool((logprobs.argmax(dim=-1) == index).all())
    return float(chosen.sum()), greedy


def _cache_argument(model: Any) -> str:
    """`cache` in recent transformers, `past_key_values` before (the same name on the output)."""
    parameters = inspect.signature(_base_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def attention_kernel(model: Any, kv_cache: bool) -> Iterator[None]:
    """Inside: a kernel that isolates packed samples (`kv_cache=False`) or one exact under a KV cache.

    Packed rows need a varlen kernel (the model's own where it is one, else the project's per-sample
    SDPA); cached tails need sdpa or eager. The model's kernel is restored on the way out.
    """
    from tunesmith.models.attention import VARLEN_KERNELS, generation_attention
    from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA
    from tunesmith.models.varlen_attention import register_varlen_sdpa

    base = _base_model(model)
    current = base.config._attn_implementation
    if kv_cache:
        wanted = generation_attention(current, base.config)
    else:
        wanted = current if current in VARLEN_KERNELS.values() else VARLEN_SDPA
        if wanted == VARLEN_SDPA:
            register_varlen_sdpa()
    training = base.training
    base.eval()
    try:
        if wanted != current:
            base.set_attn_implementation(wanted)
            if base.config._attn_implementation != wanted:
                raise RuntimeError(
                    f"{type(base).__name__} cannot switch its attention from {current} to {wanted}"
                )
        yield
    finally:
        if base.config._attn_implementation != current:
            base.set_attn_implementation(current)
        base.train(training)
