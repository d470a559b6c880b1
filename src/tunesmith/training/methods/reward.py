"""Reward model: a scalar head on each answer's last token, trained on preference pairs (Bradley-Terry).

The data, batches and packing are the pair methods' (methods/pairs.py): a micro-batch holds `train.batch_size` pairs, and the
prompt + chosen and prompt + rejected sequences of all of them share one padding-free row. The
decoder's last hidden state at each sequence's last token goes through a linear head (hidden -> 1,
no bias, fp32) to give its score r; the loss per pair is -log s(r_chosen - r_rejected - margin),
plus c (r_chosen + r_rejected)^2 with `reward.center_rewards_coefficient`, summed over pairs so the
loop's per-pair scaling keeps accumulation exact. The LM head is never run (and, where it is not
tied to the input embeddings, frozen: it has nothing to learn here).

The head is a parameter of the wrapper (`RewardScorer.score`), so the loop's optimizer,
checkpoints and final save hold it beside the model's trainable parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tunesmith.config.schema import RunConfig
from tunesmith.data.errors import DataError
from tunesmith.data.preference import TokenizedPair, build_preference_data
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import MicroBatch
from tunesmith.training.losses import CausalLMWithLoss
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.methods.pairs import PairStream, collate_pairs, pairs_fingerprint
from tunesmith.training.methods.preference_losses import bradley_terry_loss
from tunesmith.training.sequence_logps import sequence_ids

HEAD_NAME = "score"
"""The head's attribute (and checkpoint/safetensors key prefix): `score.weight`, as transformers'
`*ForSequenceClassification` names it, so the head drops into such a model unchanged."""


def last_token_positions(
    labels: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of each scored sequence's last token, and each sequence's index in the batch.

    Sequences start where the position ids restart at 0 (over the flattened batch); a sequence is
    scored when it holds labelled (answer) tokens, so a padding tail is never one. An answer ends
    its sequence, so its last token is the sequence's last real token.
    """
    seq = sequence_ids(position_ids).reshape(-1)
    n_sequences = int(seq[-1]) + 1
    ends = torch.searchsorted(seq, torch.arange(n_sequences, device=seq.device), right=True) - 1
    labelled = torch.bincount(seq[labels.reshape(-1) != IGNORE_INDEX], minlength=n_sequences)
    scored = torch.nonzero(labelled > 0).reshape(-1)
    return ends[scored], scored


class RewardScorer(CausalLMWithLoss):
    """One forward call: the score of every scored sequence of a packed batch, in order, shape (S,)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, seed: int = 0) -> None:
        super().__init__(model, chunk_size)
        config = self._parts[0].config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.score = new_head(text.hidden_size, getattr(text, "initializer_range", 0.02), seed)
        _freeze_untied_lm_head(model, self._parts[1])

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, **inputs: Any
    ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, position_ids=position_ids, **inputs)
        positions, _ = last_token_positions(labels, position_ids)
        last = hidden.reshape(-1, hidden.shape[-1])[positions]
        with torch.autocast(last.device.type, enabled=False):  # scores in fp32, whatever the run's precision
            return nn.functional.linear(last.float(), self.score.weight.float())[:, 0]


def new_head(hidden_size: int, std: float, seed: int) -> nn.Linear:
    """hidden -> 1, no bias, drawn N(0, std) from its own generator seeded with `train.seed`.

    The same start transformers gives a fresh `score` layer (so TRL users see the same initial
    scale), fixed by the seed alone: it neither consumes nor depends on the global RNG stream.
    """
    head = torch.nn.utils.skip_init(nn.Linear, hidden_size, 1, bias=False)  # no draw from the global RNG
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
    return head


def _freeze_untied_lm_head(model: nn.Module, head: nn.Module) -> None:
    """The LM head takes no part in the loss: frozen, it is neither optimised, checkpointed nor left
    unused under DDP. Tied to the input embeddings, it is those embeddings, and stays as it is."""
    embeddings = model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is getattr(head, "weight", None):
        return
    head.requires_grad_(False)


def pair_margins(pairs: Sequence[TokenizedPair]) -> torch.Tensor | None:
    """Each pair's margin, or None when no pair has one; a mix is refused (name the first row without)."""
    given = [p.margin is not None for p in pairs]
    if not any(given):
        return None
    if not all(given):
        first = next(p for p in pairs if p.margin is None)
        raise DataError(
            f"{first.source}: this pair has no margin, but {sum(given)} of {len(pairs)} pairs have one; give "
            "every pair a numeric `margin` or none (a missing margin is not taken as 0)"
        )
    return torch.tensor([float(p.margin) for p in pairs], dtype=torch.float32)  # type: ignore[arg-type]


def collate_reward_pairs(pairs: Sequence[TokenizedPair], pad_id: int, block_mask: str) -> MicroBatch:
    """The pair methods' packed row, plus a `margin` tensor (one per pair) when the pairs carry margins."""
    batch = collate_pairs(pairs, pad_id, block_mask)
    margins = pair_margins(pairs)
    if margins is not None:
        batch.tensors["margin"] = margins
    return batch


class RewardPairStream(PairStream):
    """The pair stream (same order, epochs and resume), collating each pair's margin too.

    Reward models have no reference log-probs, so `micro_batch` is PairStream's without them and
    with the margins; a `collate` hook on PairStream would make this override unnecessary.
    """

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        chosen = self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        return collate_reward_pairs([self.pairs[i] for i in chosen], self.pad_id, self.block_mask)


def reward_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """The pairs' fingerprint, plus the margins when there are any (other margins are other data)."""
    base = pairs_fingerprint(pairs)
    margins = pair_margins(pairs)
    if margins is None:
        return base
    return hashlib.sha256(base.encode() + margins.numpy().tobytes()).hexdigest()


class RewardModel:
    name = "reward"
    unit = "pair"
    zero_gradient_is_normal = False

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData:
        self.cfg = cfg
        data = build_preference_data(cfg.data, tokenizer, self.name)
        pair_margins([*data.train, *data.eval])  # a mix of pairs with and without margins stops here
        return PreparedData(data, None, reward_fingerprint(data.train))

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        t, block_mask = cfg.train, packed_mask_kind(attention)
        train = RewardPairStream(prepared.data.train, t.batch_size, pad_id, t.seed, block_mask)
        evaluation = (
            RewardPairStream(prepared.data.eval, t.batch_size, pad_id, t.seed, block_mask, shuffle=False)
            if prepared.data.eval
            else None
        )
        return train, evaluation

    def wrap_model(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        self.cfg = cfg
        return RewardScorer(model, cfg.train.loss_chunk_size, cfg.train.seed)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        assert self.cfg is not None, "prepare_data or wrap_model sets the config"
        inputs = dict(batch)
        margin = inputs.pop("margin", None)
        scores = model(**inputs)
        if scores.numel() % 2:
            raise ValueError(
                f"a batch of pairs holds {scores.numel()} scored answers; pairs need an even number"
            )
        chosen, rejected = scores[0::2], scores[1::2]
        losses, metrics = bradley_terry_loss(
            chosen,
            rejected,
            margin.to(scores.dtype) if margin is not None else None,
            center_rewards_coefficient=self.cfg.reward.center_rewards_coefficient,
        )
        metric_sums = {name: value.detach().float().sum() for name, value in metrics.items()}
        return LossOutput(losses.sum(), torch.tensor(chosen.numel()), metric_sums)
