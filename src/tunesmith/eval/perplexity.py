"""Perplexity of a model on any data file in the training formats, scored the way training scores it.

Rows are read, rendered with the chat template and masked by the training data pipeline (assistant
tokens only unless `all_tokens`; raw `text` rows score every token after BOS, long ones in windows of
`seq_len`), then packed padding-free into rows and run through the training forward
(`CausalLMWithLoss.hidden_states`) with per-sample attention (`varlen_sdpa`, or the block-diagonal
mask where the model cannot switch kernels): restarting position ids alone would not stop attention
across packed samples in transformers' sdpa/eager. The LM head runs over labelled positions only,
in chunks, so the `tokens x vocab` logits never exist at once.

`per_item` holds, per source row in file order (rows with nothing to score are left out): `nll`
(the row's mean over its scored tokens), `token_acc` (the row's fraction of scored tokens whose
argmax is the label) and `tokens` (how many it has). The task's `nll` and `token_acc` are the
`tokens`-weighted means of the row values, and a comparison between runs weights them the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.schema import EvalTask
from tunesmith.data.conversation import RowRef, TextSample
from tunesmith.data.errors import DataError
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.eval.results import TaskResult

DEFAULT_SEQ_LEN = 2048
HEAD_CHUNK = 1024
"""Labelled positions per LM-head chunk: at most this many rows of logits exist at once."""


@dataclass
class ScoredItems:
    """Per-item sums over scored tokens."""

    nll: list[float]
    correct: list[int]
    tokens: list[int]


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    task: EvalTask,
    *,
    log_samples: bool = False,
    template: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_tokens: int = 8192,
) -> TaskResult:
    """`nll`, `ppl` and `token_acc` over the scored tokens of `task.path`.

    `template`: a `data.template` value (built-in name, `.jinja` file); None uses the tokenizer's own,
    which for a loaded run is the template it trained with. Conversations longer than `seq_len` are
    cut as training cuts them; `batch_tokens` bounds the tokens of one packed forward.
    """
    samples, owners, refs = tokenized_items(tokenizer, task, template, seq_len)
    scored = score_samples(model, tokenizer, samples, owners, len(refs), batch_tokens)
    per_nll = [s / n for s, n in zip(scored.nll, scored.tokens, strict=True)]
    per_acc = [c / n for c, n in zip(scored.correct, scored.tokens, strict=True)]
    total = sum(scored.tokens)
    nll = sum(scored.nll) / total
    result = TaskResult(
        task=f"perplexity:{task.path}",
        n=len(refs),
        metrics={"nll": nll, "ppl": math.exp(nll), "token_acc": sum(scored.correct) / total},
        per_item={"nll": per_nll, "token_acc": per_acc, "tokens": [float(n) for n in scored.tokens]},
    )
    if log_samples:
        result.samples = [
            {"source": str(ref), "tokens": scored.tokens[i], "nll": per_nll[i], "token_acc": per_acc[i]}
            for i, ref in enumerate(refs)
        ]
    return result


def tokenized_items(
    tokenizer: Any, task: EvalTask, template: str | None, seq_len: int
) -> tuple[list[TokenizedSample], list[int], list[RowRef]]:
    """(samples as training tokenizes them, the item each belongs to, each item's source row).

    A raw-text row may become several windows, all of one item; rows with nothing to score are
    left out, as training drops them.
    """
    from tunesmith.data.batch_tokenize import TokenizeSettings, tokenize_chunk
    from tunesmith.data.templates import resolve_template
    from tunesmith.data.validate import BadRowError, read_samples

    with plain_path_errors():
        rows = read_samples(task.path, "auto", on_error="raise", label=LABEL).samples
    if task.limit is not None:
        rows = rows[: task.limit]
    text = [isinstance(r, TextSample) for r in rows]
    if any(text) and not all(text):
        raise DataError(f"{task.path}: mixes raw-text rows and conversations; score them as two tasks")
    method = "pretrain" if rows and all(text) else "sft"
    chat_template = None if method == "pretrain" else resolve_template(tokenizer, template)
    settings = TokenizeSettings(seq_len, method, train_on_prompt=task.all_tokens)
    done = tokenize_chunk(rows, tokenizer, chat_template, settings)
    if done.failed:
        raise BadRowError(done.failed[0])
    samples = [s for s in done.block.to_samples() if _scored(s)]
    if not samples:
        raise DataError(
            f"{task.path}: no row has tokens to score (assistant replies; set all_tokens to score prompts too)"
        )
    index: dict[RowRef, int] = {}
    owners = [index.setdefault(s.source, len(index)) for s in samples]
    return samples, owners, list(index)


LABEL = "eval-task"
"""The label the data readers put in front of a path's errors (`{label}.path: ...`), taken out again."""


@contextlib.contextmanager
def plain_path_errors() -> Iterator[None]:
    """Data errors from the training readers without their config-key wording (`data.train[0].path`):
    a task is a file named on the command line or in `eval.tasks`, which has no format key."""
    try:
        yield
    except DataError as exc:
        text = str(exc).replace(f"{LABEL}.path: ", "").replace(f", or set {LABEL}.format", "")
        raise DataError(text.replace(LABEL, "eval task")) from None


def _scored(sample: TokenizedSample) -> bool:
    """Whether the packed forward predicts any of its labels (a sample's first token never is)."""
    return any(label != IGNORE_INDEX for label in sample.labels[1:])


@torch.no_grad()
def score_samples(
    model: Any,
    tokenizer: Any,
    samples: Sequence[TokenizedSample],
    owners: Sequence[int],
    n_items: int,
    batch_tokens: int = 8192,
) -> ScoredItems:
    """Per item: summed NLL, argmax hits and count over its samples' labelled next tokens."""
    from tunesmith.data.packing import collate_packed, pack_first_fit_decreasing
    from tunesmith.training.losses import CausalLMWithLoss, head_logits

    wrapper = CausalLMWithLoss(model)
    _, head, softcap = wrapper._parts
    device = next(model.parameters()).device
    nll = torch.zeros(n_items, dtype=torch.float64)
    correct = torch.zeros(n_items, dtype=torch.long)
    counts = torch.zeros(n_items, dtype=torch.long)
    capacity = max(max(len(s.input_ids) for s in samples), batch_tokens)
    bins = pack_first_fit_decreasing([len(s.input_ids) for s in samples], capacity)
    with packed_attention(model) as mask_kind:
        for row in bins:
            batch = collate_packed([[samples[i] for i in row]], tokenizer.pad_token_id, mask_kind)
            owner = _owner_row(row, samples, owners, batch["input_ids"].shape[1])
            labels = batch.pop("labels")
            hidden = wrapper.hidden_states(
                batch.pop("input_ids").to(device), **{k: v.to(device) for k, v in batch.items()}
            )
            targets = labels[:, 1:].to(device)
            selected = targets != IGNORE_INDEX
            flat_hidden, flat_targets = hidden[:, :-1][selected], targets[selected]
            flat_owner = owner[:, 1:][selected.cpu()]
            for start in range(0, flat_targets.numel(), HEAD_CHUNK):
                stop = start + HEAD_CHUNK
                logits = head_logits(flat_hidden[start:stop], head.weight, head.bias, softcap)
                t = flat_targets[start:stop]
                logp = torch.gather(logits.log_softmax(-1), 1, t[:, None])[:, 0]
                who = flat_owner[start:stop]
                nll.index_add_(0, who, -logp.double().cpu())
                correct.index_add_(0, who, (logits.argmax(-1) == t).long().cpu())
                counts.index_add_(0, who, torch.ones_like(who))
    return ScoredItems(nll.tolist(), correct.tolist(), counts.tolist())


def _owner_row(
    row: Sequence[int], samples: Sequence[TokenizedSample], owners: Sequence[int], width: int
) -> torch.Tensor:
    """(1, width) item index of each position of a packed row (0 on the padding tail, never labelled)."""
    owner = torch.zeros((1, width), dtype=torch.long)
    offset = 0
    for i in row:
        n = len(samples[i].input_ids)
        owner[0, offset : offset + n] = owners[i]
        offset += n
    return owner


@contextlib.contextmanager
def packed_attention(model: Any) -> Iterator[str]:
    """The model on per-sample varlen attention inside (as training runs it); yields the mask kind
    `collate_packed` must build. A model that cannot switch kernels keeps its own, with the
    block-diagonal mask that isolates packed samples for it."""
    from tunesmith.models.attention import packed_mask_kind
    from tunesmith.models.varlen_attention import NAME, register_varlen_sdpa

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    switched = False
    if packed_mask_kind(before) != "none":
        register_varlen_sdpa()
        with contextlib.suppress(ValueError, NotImplementedError):
            base.set_attn_implementation(NAME)
        switched = base.config._attn_implementation == NAME
    try:
        yield packed_mask_kind(base.config._attn_implementation)
    finally:
        if switched:
            base.set_attn_implementation(before)
