"""SimPO: prefer the chosen answer by its mean per-token log-prob, with a target margin; no reference.

Meng et al. 2024: the reward of an answer is beta times its length-normalised log-prob, and the
loss is -log s(r_w - r_l - gamma). Pairs go through one packed forward (see pairs.py); there is
no reference pass and no reference copy, so a step costs one forward and one backward.
"""

from __future__ import annotations

import torch

from tunesmith.training.methods.pairs import PairLogps, PairMethod
from tunesmith.training.methods.preference_losses import simpo_loss


class SimPO(PairMethod):
    name = "simpo"

    def pair_losses(
        self, logps: PairLogps, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.cfg is not None
        settings = self.cfg.simpo
        chosen, rejected = logps.chosen_avg, logps.rejected_avg
        losses, metrics = simpo_loss(
            chosen,
            rejected,
            beta=settings.beta,
            gamma=settings.gamma,
            label_smoothing=settings.label_smoothing,
        )
        # As TRL's CPO trainer logs them for SimPO: per-token means, the quantities trained on.
        metrics["logps/chosen"] = chosen.detach()
        metrics["logps/rejected"] = rejected.detach()
        return losses, metrics
