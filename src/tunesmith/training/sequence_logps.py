"""Per-sequence log-probabilities of the labelled tokens of a packed batch, without full logits.

Preference methods score whole answers: the sum (and count) of log p(token) over each answer's
tokens. Sequences are found where the position ids restart at 0, so chosen and rejected answers of
many pairs share one padding-free row. The LM head runs over labelled positions only, in chunks
(recomputed in the backward), so the (tokens x vocab) logits never exist at once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.training.losses import CausalLMWithLoss, head_logits


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids -> (B, L) index of the sequence each position belongs to, over the batch."""
    return torch.cumsum((position_ids.reshape(-1) == 0).long(), 0).reshape(position_ids.shape) - 1


def _token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    logits = head_logits(hidden, weight, bias, softcap)
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None])[:, 0]


def sequence_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    lm_head: nn.Linear,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token log-probs over each sequence's labelled targets, and how many there are.

    Returns two (S,) tensors, S being the number of sequences in the batch (a padding tail counts as
    one sequence with nothing labelled).
    """
    seq = sequence_ids(position_ids)
    n_sequences = int(seq.max()) + 1
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    flat_hidden = hidden[:, :-1][selected]
    flat_targets = targets[selected]
    owner = seq[:, 1:][selected]
    sums = hidden.new_zeros(n_sequences, dtype=torch.float32) + 0.0 * hidden.sum()  # connected for DDP
    counts = torch.bincount(owner, minlength=n_sequences)
    weight, bias = lm_head.weight, lm_head.bias
    for start in range(0, flat_targets.numel(), chunk_size):
        h, t = flat_hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and flat_targets.numel() > chunk_size:
            logps = checkpoint(_token_logps, h, t, weight, bias, softcap, use_reentrant=False)
        else:
            logps = _token_logps(h, t, weight, bias, softcap)
        sums = sums.index_add(0, owner[start : start + chunk_size], logps)
    return sums, counts


class SequenceScorer(CausalLMWithLoss):
    """One forward call: (per-sequence log-prob sums, per-sequence labelled-token counts)."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, **inputs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, head, softcap = self._parts
        hidden = self.hidden_states(input_ids, position_ids=position_ids, **inputs)
        return sequence_logps(hidden, labels, position_ids, head, self.chunk_size, softcap)
