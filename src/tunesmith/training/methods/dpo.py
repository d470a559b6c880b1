"""Direct preference optimisation: raise the chosen answer's log-ratio to a reference over the rejected's.

A micro-batch holds `train.batch_size` pairs; chosen and rejected answers of all of them go through
one padding-free packed forward pass (the prompt written once per answer, never padded to the
longer answer). The loss is summed over pairs, so the loop's per-unit scaling makes accumulation
and several processes exact. The reference model costs no second copy with LoRA (the same base
with the adapter switched off); full and freeze tuning keep a frozen copy made before training.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.data.packing import collate_packed
from tunesmith.data.preference import TokenizedPair, build_preference_data
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import MicroBatch, epoch_order
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.methods.preference_losses import dpo_loss
from tunesmith.training.resume_policy import samples_fingerprint
from tunesmith.training.sequence_logps import SequenceScorer


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


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, block_mask: str) -> MicroBatch:
    """One packed row: chosen_0, rejected_0, chosen_1, rejected_1, ..."""
    samples = [sample for pair in pairs for sample in pair_samples(pair)]
    tensors = collate_packed([samples], pad_id, block_mask)
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

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.pairs), self.seed, epoch, self.shuffle)

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        chosen = self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        return collate_pairs([self.pairs[i] for i in chosen], self.pad_id, self.block_mask)

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {}  # the micro-batch index alone determines every batch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    return samples_fingerprint([sample for pair in pairs for sample in pair_samples(pair)])


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
    def reference_logps(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference:
            return self._reference[0](**batch)
        with _adapter_disabled(self.model):
            return self(**batch)


@contextlib.contextmanager
def _adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model as it was before training: peft's adapter switch, which allocates nothing."""
    with model.disable_adapter():
        yield


class DPO:
    name = "dpo"
    unit = "pair"

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None

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
        return train, evaluation

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        self.cfg = cfg
        reference = None
        if not isinstance(cfg.adapter, LoraAdapter):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return PairScorer(model, cfg.train.loss_chunk_size, reference)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        assert self.cfg is not None, "prepare_data or wrap_model sets the config"
        settings = self.cfg.dpo
        sums, counts = model(**batch)
        scorer = model.module if hasattr(model, "module") else model  # DDP keeps the wrapper as .module
        ref_sums, _ = scorer.reference_logps(**batch)
        n_pairs = _pair_count(sums, counts)
        chosen, rejected = sums[0 : 2 * n_pairs : 2], sums[1 : 2 * n_pairs : 2]
        ref_chosen, ref_rejected = ref_sums[0 : 2 * n_pairs : 2], ref_sums[1 : 2 * n_pairs : 2]
        chosen_n, rejected_n = counts[0 : 2 * n_pairs : 2], counts[1 : 2 * n_pairs : 2]
        losses, metrics = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=settings.beta,
            loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing,
            chosen_lengths=chosen_n,
            rejected_lengths=rejected_n,
            rpo_alpha=settings.rpo_alpha or 0.0,
            rpo_tokens_per_pair=float(chosen_n.sum()) / max(n_pairs, 1),
        )
        metric_sums = {name: value.detach().float().sum() for name, value in metrics.items()}
        return LossOutput(losses.sum(), torch.tensor(n_pairs), metric_sums)


def _pair_count(sums: torch.Tensor, counts: torch.Tensor) -> int:
    """Pairs in the batch: sequences with scored tokens come in (chosen, rejected) twos."""
    scored = int((counts > 0).sum())
    if scored % 2:
        raise ValueError(f"a batch of pairs holds {scored} scored answers; pairs need an even number")
    return scored // 2
