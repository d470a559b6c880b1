"""ORPO: SFT on the chosen answer plus an odds-ratio term against the rejected one; no reference.

Hong et al. 2024, Eq. 6: L = NLL(y_w) + beta * -log s(log odds(y_w) - log odds(y_l)), the odds
taken on each answer's mean per-token probability. Pairs go through one packed forward (see
pairs.py); there is no reference pass.

The NLL is each pair's chosen-answer token mean (answer tokens only, as SFT trains). TRL's
ORPOTrainer takes one token mean over all chosen tokens of a micro-batch, prompt tokens included;
a micro-batch mean would make gradient accumulation and several processes depend on how pairs are
split into micro-batches, while a per-pair mean summed over pairs stays exact under the loop's
division by the step's pair count. The two agree when the chosen answers are equally long.
"""

from __future__ import annotations

import torch

from tunesmith.training.methods.pairs import PairLogps, PairMethod
from tunesmith.training.methods.preference_losses import orpo_loss


class ORPO(PairMethod):
    name = "orpo"

    def pair_losses(
        self, logps: PairLogps, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.cfg is not None
        chosen, rejected = logps.chosen_avg, logps.rejected_avg
        odds_losses, metrics = orpo_loss(chosen, rejected, beta=self.cfg.orpo.beta)
        nll = -chosen
        metrics["nll"] = nll.detach()
        metrics["logps/chosen"] = chosen.detach()
        metrics["logps/rejected"] = rejected.detach()
        return nll + odds_losses, metrics
