"""Direct preference optimisation: raise the chosen answer's log-ratio to a reference over the rejected's.

Pairs go through one packed forward (see pairs.py); the loss is summed over pairs, and the
optional NLL term on chosen answers (`dpo.rpo_alpha`) over their tokens, each divided by the
step's count of its unit (see base.py), so accumulation stays exact with it. The reference
costs no second copy with LoRA (the same base with the adapter switched off); full and freeze
tuning keep a frozen copy made before training, unless `dpo.precompute_ref` computes the
reference log-probs of every pair once, before the first update, and carries them with the data.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.training.batching import MicroBatch
from tunesmith.training.methods.base import LossOutput
from tunesmith.training.methods.pairs import (
    REFERENCE_KEY,
    PairLogps,
    PairMethod,
    PairScorer,
    PairStream,
    adapter_disabled,
    autocast_like_loop,
    chosen_token_count,
    collate_pairs,
    evaluating,
    pair_samples,
    pairs_fingerprint,
    precompute_reference,
    split_pairs,
    unwrapped,
)
from tunesmith.training.methods.preference_losses import dpo_loss
from tunesmith.training.sequence_logps import SequenceScorer

__all__ = ["DPO", "PairScorer", "PairStream", "collate_pairs", "pair_samples", "pairs_fingerprint"]

log = logging.getLogger(__name__)

CHOSEN_TOKEN = "chosen_token"
"""The unit of the RPO term (`dpo.rpo_alpha`): a scored token of a chosen answer."""


class DPO(PairMethod):
    name = "dpo"

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        self.cfg = cfg
        chunk = cfg.train.loss_chunk_size
        if cfg.dpo.precompute_ref:
            self._precompute_reference(model, cfg)
            return SequenceScorer(model, chunk)
        reference = None
        if not isinstance(cfg.adapter, LoraAdapter):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return PairScorer(model, chunk, reference)

    def _precompute_reference(self, model: torch.nn.Module, cfg: RunConfig) -> None:
        """Every pair's reference log-probs, from `model` before its first update, kept in the streams.

        The loop hands the model over before any step and before a checkpoint is restored, so a
        resumed run computes the same numbers. The pass matches the live reference's: the same
        device and autocast as the loop, no dropout, the adapter (if any) switched off.
        """
        from accelerate import PartialState

        if self.streams is None:
            raise RuntimeError(
                "dpo.precompute_ref: batches() must build the pair streams before wrap_model()"
            )
        device = PartialState().device
        model.to(device)
        scorer = SequenceScorer(model, cfg.train.loss_chunk_size)
        with contextlib.ExitStack() as passes:
            passes.enter_context(evaluating(model))
            if isinstance(cfg.adapter, LoraAdapter):
                passes.enter_context(adapter_disabled(model))
            passes.enter_context(autocast_like_loop(cfg, device.type))
            for stream in self.streams:
                if stream is not None:
                    stream.reference = precompute_reference(scorer, stream, device)
        total = sum(len(s.pairs) for s in self.streams if s is not None)
        log.info("dpo.precompute_ref: reference log-probs of %d pairs computed before training", total)

    def pair_losses(
        self, logps: PairLogps, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.cfg is not None
        settings = self.cfg.dpo
        ref_chosen, ref_rejected = split_pairs(self._reference_sums(model, batch), logps.n)
        return dpo_loss(
            logps.chosen,
            logps.rejected,
            ref_chosen,
            ref_rejected,
            beta=settings.beta,
            loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing,
            chosen_lengths=logps.chosen_tokens,
            rejected_lengths=logps.rejected_tokens,
        )  # rpo_alpha's NLL term has a unit of its own, the chosen token: see add_terms

    def term_units(self, mb: MicroBatch) -> dict[str, int]:
        """With `dpo.rpo_alpha`, the micro-batch's chosen-answer tokens: the NLL term's unit."""
        assert self.cfg is not None
        return {CHOSEN_TOKEN: chosen_token_count(mb.tensors)} if self.cfg.dpo.rpo_alpha else {}

    def add_terms(self, out: LossOutput, logps: PairLogps) -> LossOutput:
        """RPO: rpo_alpha times the chosen answers' NLL, summed over their tokens.

        The loop divides it by the step's chosen tokens on all processes, so the term is TRL's
        token mean over the chosen answers of the whole step, whatever the accumulation.
        """
        assert self.cfg is not None
        alpha = self.cfg.dpo.rpo_alpha
        if alpha:
            nll = -logps.chosen.sum()
            out.terms[CHOSEN_TOKEN] = alpha * nll
            out.metrics["nll_loss"] = nll.detach().float()
            out.metric_counts["nll_loss"] = logps.chosen_tokens.sum().float()
        return out

    def _reference_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's per-answer log-prob sums: carried with the batch, or a live pass."""
        if REFERENCE_KEY in batch:
            return batch[REFERENCE_KEY]
        assert self.cfg is not None
        if self.cfg.dpo.precompute_ref:
            raise RuntimeError("dpo.precompute_ref: this batch carries no reference log-probs")
        scorer = unwrapped(model)
        assert isinstance(scorer, PairScorer)
        sums, _ = scorer.reference_logps(**batch)
        return sums
