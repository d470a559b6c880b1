"""What the pair methods (dpo, simpo, orpo) share: pair batches, one packed forward, per-pair losses.

A micro-batch holds `train.batch_size` pairs; chosen and rejected answers of all of them go through
one padding-free packed forward pass (the prompt written once per answer, never padded to the
longer answer), laid out chosen_0, rejected_0, chosen_1, ... . A method turns the answers'
log-prob sums and token counts into one loss per pair; `PairMethod` sums them, so the loop's
per-unit scaling makes accumulation and several processes exact. Reference log-probs computed
before training (`dpo.precompute_ref`) travel with the pairs, under `REFERENCE_KEY`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.schema import RunConfig
from tunesmith.data.packing import collate_packed
from tunesmith.data.preference import TokenizedPair, build_preference_data
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import MicroBatch, epoch_order
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.methods.reference import follow_batch
from tunesmith.training.precision import resolve_precision
from tunesmith.training.resume_policy import samples_fingerprint
from tunesmith.training.sequence_logps import SequenceScorer, sequence_ids

REFERENCE_KEY = "reference_logps"
"""Batch key of carried reference log-prob sums, (2 * pairs,) in the packed row's answer order."""

Scores = tuple[torch.Tensor, torch.Tensor]
"""Per-sequence log-prob sums and labelled-token counts, as `SequenceScorer` returns them."""


def pair_samples(pair: TokenizedPair) -> tuple[TokenizedSample, TokenizedSample]:
    """The pair as two samples: the shared prompt (not scored) followed by each answer (scored)."""
    prompt_labels = [IGNORE_INDEX] * len(pair.prompt_ids)
    chosen = TokenizedSample(
        [*pair.prompt_ids, *pair.chosen_ids], [*prompt_labels, *pair.chosen_ids], pair.source
    )
    rejected = TokenizedSample(
        [*pair.prompt_ids, *pair.rejected_ids], [*prompt_labels, *pair.rejected_ids], pair.source
    )
    return chosen, rejected


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_id: int, block_mask: str, reference: torch.Tensor | None = None
) -> MicroBatch:
    """One packed row: chosen_0, rejected_0, chosen_1, rejected_1, ...

    `reference` (pairs, 2): the pairs' precomputed reference log-prob sums, carried in the batch.
    """
    samples = [sample for pair in pairs for sample in pair_samples(pair)]
    tensors = collate_packed([samples], pad_id, block_mask)
    if reference is not None:
        tensors[REFERENCE_KEY] = reference.reshape(-1)
    return MicroBatch(
        tensors=tensors,
        sources=[str(pair.source) for pair in pairs],
        trained_tokens=sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        real_tokens=sum(len(s.input_ids) for s in samples),
        units=len(pairs),
    )


class PairStream:
    """Micro-batches of pairs over epochs, each epoch in a permutation seeded by (seed, epoch)."""

    fill = None

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        batch_size: int,
        pad_id: int,
        seed: int,
        block_mask: str,
        shuffle: bool = True,
    ) -> None:
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.seed, self.block_mask, self.shuffle = seed, block_mask, shuffle
        self.per_epoch = math.ceil(len(pairs) / batch_size)
        self.reference: torch.Tensor | None = None
        """(len(pairs), 2) reference log-prob sums, chosen then rejected, once precomputed."""

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.pairs), self.seed, epoch, self.shuffle)

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        chosen = self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        reference = self.reference[chosen] if self.reference is not None else None
        return collate_pairs([self.pairs[i] for i in chosen], self.pad_id, self.block_mask, reference)

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {}  # the micro-batch index alone determines every batch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    return samples_fingerprint([sample for pair in pairs for sample in pair_samples(pair)])


@dataclass(frozen=True)
class PairLogps:
    """Per-pair log-prob sums over each answer's tokens, and the token counts, from one packed row."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def from_scores(cls, sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
        n = pair_count(counts)
        chosen, rejected = split_pairs(sums, n)
        chosen_tokens, rejected_tokens = split_pairs(counts, n)
        return cls(chosen, rejected, chosen_tokens, rejected_tokens)

    @property
    def n(self) -> int:
        return int(self.chosen.numel())

    @property
    def chosen_avg(self) -> torch.Tensor:
        """Mean log-prob per chosen-answer token: the length normalisation of SimPO and ORPO."""
        return self.chosen / self.chosen_tokens.to(self.chosen.dtype).clamp(min=1.0)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.to(self.rejected.dtype).clamp(min=1.0)


def pair_count(counts: torch.Tensor) -> int:
    """Pairs in the batch: sequences with scored tokens come in (chosen, rejected) twos."""
    scored = int((counts > 0).sum())
    if scored % 2:
        raise ValueError(f"a batch of pairs holds {scored} scored answers; pairs need an even number")
    return scored // 2


def split_pairs(values: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen (even) and rejected (odd) entries of per-answer values of `n_pairs` pairs."""
    return values[0 : 2 * n_pairs : 2], values[1 : 2 * n_pairs : 2]


def chosen_token_count(tensors: dict[str, torch.Tensor]) -> int:
    """Scored tokens of the chosen answers of a packed pair row, counted as `SequenceScorer` counts them."""
    targets = tensors["labels"][:, 1:]
    owner = sequence_ids(tensors["position_ids"])[:, 1:][targets != IGNORE_INDEX]
    counts = torch.bincount(owner.reshape(-1))
    chosen, _ = split_pairs(counts, pair_count(counts))
    return int(chosen.sum())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without what travels with the data for the loss alone (carried reference log-probs)."""
    return {key: value for key, value in batch.items() if key != REFERENCE_KEY}


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for a reference pass, then back in its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model as it was before training: peft's adapter switch, which allocates nothing."""
    with model.disable_adapter():
        yield


class PairScorer(SequenceScorer):
    """The policy's and the reference's per-answer log-probs for a packed batch of pairs."""

    def __init__(
        self, model: torch.nn.Module, chunk_size: int, frozen_reference: torch.nn.Module | None
    ) -> None:
        super().__init__(model, chunk_size)
        # A tuple, not an attribute: the reference is not trained, prepared or checkpointed.
        self._reference = (
            (SequenceScorer(frozen_reference, chunk_size),) if frozen_reference is not None else ()
        )

    @torch.no_grad()
    def reference_logps(self, **batch: torch.Tensor) -> Scores:
        """A frozen copy's scores, or (LoRA) the base's with the adapter off; dropout off in both."""
        if self._reference:
            return follow_batch(self._reference[0], batch)(**batch)
        with evaluating(self.model), adapter_disabled(self.model):
            return self(**batch)


def autocast_like_loop(cfg: RunConfig, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast the loop runs `compute_loss` under (accelerate's for bf16, its own for fp16).

    Passes computed outside the loop (precomputed reference log-probs) use it to get the numbers
    the same pass inside the loop would give.
    """
    precision = resolve_precision(cfg.train.precision, device_type)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type, dtype=dtype)


@torch.no_grad()
def precompute_reference(
    score: Callable[..., Scores], stream: PairStream, device: torch.device
) -> torch.Tensor:
    """(pairs, 2) reference log-prob sums of every pair of `stream`, in micro-batches of its size.

    `score` is the reference pass (called on a packed batch's tensors); the caller sets up the
    model's mode, device and autocast.
    """
    rows = []
    for start in range(0, len(stream.pairs), stream.batch_size):
        chunk = stream.pairs[start : start + stream.batch_size]
        batch = collate_pairs(chunk, stream.pad_id, stream.block_mask).tensors
        sums, _ = score(**{key: value.to(device) for key, value in batch.items()})
        chosen, rejected = split_pairs(sums.float(), len(chunk))
        rows.append(torch.stack([chosen, rejected], dim=1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2)


class PairMethod:
    """A method that trains on chosen/rejected pairs, one loss per pair; subclasses give `pair_losses`."""

    name = "pairs"
    unit = "pair"
    zero_gradient_is_normal = False

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None
        self.streams: tuple[PairStream, PairStream | None] | None = None

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData:
        self.cfg = cfg
        data = build_preference_data(cfg.data, tokenizer, self.name)
        return PreparedData(data, None, pairs_fingerprint(data.train))

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        t, block_mask = cfg.train, packed_mask_kind(attention)
        train = PairStream(prepared.data.train, t.batch_size, pad_id, t.seed, block_mask)
        evaluation = (
            PairStream(prepared.data.eval, t.batch_size, pad_id, t.seed, block_mask, shuffle=False)
            if prepared.data.eval
            else None
        )
        self.streams = (train, evaluation)
        return train, evaluation

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        """Reference-free by default: the policy's scores are all the loss needs."""
        self.cfg = cfg
        return SequenceScorer(model, cfg.train.loss_chunk_size)

    def pair_losses(
        self, logps: PairLogps, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (n,) and per-pair metrics, from the policy's scores of the batch."""
        raise NotImplementedError

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        assert self.cfg is not None, "prepare_data or wrap_model sets the config"
        sums, counts = model(**model_inputs(batch))
        logps = PairLogps.from_scores(sums, counts)
        losses, metrics = self.pair_losses(logps, model, batch)
        metric_sums = {name: value.detach().float().sum() for name, value in metrics.items()}
        return self.add_terms(LossOutput(losses.sum(), torch.tensor(logps.n), metric_sums), logps)

    def add_terms(self, out: LossOutput, logps: PairLogps) -> LossOutput:
        """`out` with the loss terms that have units of their own (see base.py); none by default."""
        return out


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module the method built: DDP keeps the wrapper's original as `.module`."""
    return model.module if hasattr(model, "module") else model
