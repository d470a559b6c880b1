"""Pure losses for preference and RL methods, on per-sequence quantities.

Every function returns per-example losses of shape (B,) and a dict of per-example metric tensors,
all meant to be SUMMED over the examples of a micro-batch: the loop divides by the step's global
unit count (pairs, examples or sequences; tokens for the token-normalised GRPO variants). With
that contract each function reproduces TRL 1.x's batch loss and its gradients: TRL takes the mean
over the batch, which is the sum divided by the batch's unit count.

Inputs are what `training.sequence_logps` produces: the SUM of next-token log-probs over an
answer's labelled tokens, and the number of those tokens. Functions that want length-averaged
log-probs (SimPO, ORPO) say so in their argument names.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]
LossAndMetrics = tuple[torch.Tensor, Metrics]

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
GRPOLossType = Literal["grpo", "dr_grpo", "bnpo", "dapo"]
RewardScaling = bool | Literal["group", "batch", "none"]

_STD_EPS = 1e-4
"""Added to the reward std before dividing, as TRL's GRPO does (keeps constant groups finite)."""


# ----------------------------------------------------------------------------------------- DPO


def _pair_reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """Per-pair reward metrics, detached: they are logged, never trained on."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
    }


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-eps) log s(z) - eps log s(-z): the conservative (cDPO) form; plain -log s(z) at eps=0."""
    loss = -F.logsigmoid(logits)
    if label_smoothing == 0.0:
        return loss
    return loss * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _ipo_delta(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
) -> torch.Tensor:
    """Difference of per-token log-ratios: IPO's squared loss would otherwise grow with length."""
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(
            "dpo_loss(loss_type='ipo') needs chosen_lengths and rejected_lengths (answer token counts): "
            "IPO works on length-averaged log-ratios"
        )
    chosen_avg = chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1.0)
    rejected_avg = rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1.0)
    return chosen_avg - rejected_avg


def _check_dpo_options(loss_type: str, label_smoothing: float) -> None:
    """Reject settings TRL would silently ignore or that make the loss undefined."""
    if loss_type not in ("sigmoid", "ipo", "hinge", "robust"):
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; use sigmoid, ipo, hinge or robust")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"dpo_loss(loss_type='robust'): label_smoothing={label_smoothing} must be in [0, 0.5)"
        )
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"dpo_loss(loss_type={loss_type!r}) has no label smoothing; set label_smoothing=0")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} must be in [0, 1)")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    rpo_tokens_per_pair: torch.Tensor | float | None = None,
) -> LossAndMetrics:
    """DPO and its pairwise variants, per pair (Rafailov et al. 2023).

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), all log-probs SUMMED
    over the answer's tokens:

    - sigmoid: -log s(beta h); with label_smoothing eps, the conservative cDPO form
      -(1-eps) log s(beta h) - eps log s(-beta h). TRL 1.x ignores eps here (older TRL applied it).
    - hinge (SLiC): max(0, 1 - beta h).
    - ipo (Azar et al., Eq. 17): (h_avg - 1/(2 beta))^2, beta being IPO's tau. As in TRL, h_avg uses
      log-ratios divided by each answer's token count: pass the SUMMED log-probs and
      `chosen_lengths` / `rejected_lengths` (completion tokens per answer).
    - robust (Chowdhury et al.): ((1-eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps).

    RPO (Pang et al.): with `rpo_alpha` > 0 each pair adds rpo_alpha * nll_w / rpo_tokens_per_pair,
    nll_w = -policy_chosen_logps. TRL adds rpo_alpha times the chosen NLL averaged over ALL chosen
    tokens of the batch; to get exactly that after the loop's sum / n_pairs, pass
    rpo_tokens_per_pair = total chosen tokens / number of pairs, over the same step. Passing the
    per-pair `chosen_lengths` instead gives each pair its own per-token mean.

    Rewards (metrics) are beta * (log pi - log ref) with summed log-probs, for every loss type.
    """
    _check_dpo_options(loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "ipo":
        delta = _ipo_delta(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        clean = -(1 - label_smoothing) * F.logsigmoid(logits)
        flipped = -label_smoothing * F.logsigmoid(-logits)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    metrics = _pair_reward_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics["logps/chosen"] = policy_chosen_logps.detach()
    metrics["logps/rejected"] = policy_rejected_logps.detach()
    if rpo_alpha:
        nll = _rpo_nll(policy_chosen_logps, rpo_tokens_per_pair)
        losses = losses + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return losses, metrics


def _rpo_nll(policy_chosen_logps: torch.Tensor, tokens_per_pair: torch.Tensor | float | None) -> torch.Tensor:
    """Chosen NLL scaled so that summing over pairs and dividing by their count gives a token mean."""
    if tokens_per_pair is None:
        raise ValueError("dpo_loss: rpo_alpha > 0 needs rpo_tokens_per_pair (chosen tokens / pairs)")
    return -policy_chosen_logps / tokens_per_pair


# ------------------------------------------------------------------------------ SimPO and ORPO


def simpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> LossAndMetrics:
    """SimPO (Meng et al. 2024, Eq. 6): -log s(beta (avg_w - avg_l) - gamma), no reference model.

    Log-probs are AVERAGED over each answer's tokens (the length normalisation is the method).
    `gamma` is the target reward margin, TRL's `simpo_gamma` (the SimPO repo's gamma_beta_ratio is
    gamma / beta). label_smoothing gives the conservative form, as TRL's CPO trainer does.
    """
    logits = beta * ((chosen_logps_avg - rejected_logps_avg) - gamma / beta)
    losses = _smoothed_sigmoid(logits, label_smoothing)
    return losses, _pair_reward_metrics(beta * chosen_logps_avg, beta * rejected_logps_avg)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor, *, beta: float
) -> LossAndMetrics:
    """ORPO's odds-ratio term (Hong et al. 2024, Eq. 7): -beta log s(log odds(y_w) - log odds(y_l)).

    odds(y) = p / (1 - p) with log p the AVERAGE per-token log-prob of the answer. The method adds
    this to the SFT NLL of the chosen answer (TRL: its token mean over the chosen batch, prompt
    tokens included); that term is the method's, not this function's. Computed in fp32, as TRL.
    """
    chosen, rejected = chosen_logps_avg.float(), rejected_logps_avg.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    losses = -beta * log_sigmoid_odds
    metrics = _pair_reward_metrics(beta * chosen, beta * rejected)
    metrics["log_odds_ratio"] = log_sigmoid_odds.detach()
    metrics["log_odds_chosen"] = log_odds.detach()
    return losses, metrics


# ----------------------------------------------------------------------------------------- KTO


def kto_kl_estimate(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: mean log-ratio on mismatched (prompt, completion) pairs, >= 0, detached.

    Across processes TRL averages the per-process means before clamping: all-reduce the
    unclamped mean, then clamp, to match it there.
    """
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossAndMetrics:
    """KTO (Ethayarajh et al. 2024, Eq. 7), per example, on SUMMED log-probs.

    r = log pi(y) - log ref(y); desirable (label True): w_d (1 - s(beta (r - z0))); undesirable:
    w_u (1 - s(beta (z0 - r))). z0 is `kl_estimate` (see `kto_kl_estimate`); it carries no gradient.
    TRL's loss is the mean over all examples of the batch, desirable and undesirable alike.
    Metrics: per-class sums ("rewards/chosen" is zero on undesirable rows) and the class counts,
    so a class mean is sum("rewards/chosen") / sum("count/chosen").
    """
    desirable = labels.to(torch.bool)
    logratios = policy_logps - ref_logps
    kl = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device).detach()
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, _kto_metrics(beta * logratios.detach(), policy_logps.detach(), desirable, kl)


def _kto_metrics(
    rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor
) -> Metrics:
    """Per-class sums and counts: KTO batches mix classes, so means need their own denominators."""
    is_chosen = desirable.to(rewards.dtype)
    is_rejected = 1 - is_chosen
    return {
        "rewards/chosen": rewards * is_chosen,
        "rewards/rejected": rewards * is_rejected,
        "logps/chosen": logps * is_chosen,
        "logps/rejected": logps * is_rejected,
        "count/chosen": is_chosen,
        "count/rejected": is_rejected,
        "kl": kl.expand_as(rewards),
    }


# ------------------------------------------------------------------------------ reward models


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> LossAndMetrics:
    """Pairwise reward-model loss -log s(r_w - r_l - m) (Bradley-Terry; margin as Llama 2).

    With `center_rewards_coefficient` c, adds c (r_w + r_l)^2 (Eisenstein et al. 2023), which keeps
    the scores centred at 0, as TRL's RewardTrainer does.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    chosen, rejected = chosen_scores.detach(), rejected_scores.detach()
    metrics = {
        "accuracy": (chosen > rejected).to(chosen.dtype),
        "margin": chosen - rejected,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
    }
    return losses, metrics


# ---------------------------------------------------------------------------------------- GRPO


def _nanstd(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unbiased std ignoring NaNs; NaN where fewer than two values exist."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * (count / (count - 1))
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt()


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: RewardScaling = True
) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, over the group's std (Shao et al. 2024).

    `rewards` (N,) holds each prompt's `group_size` completions next to each other. scale_rewards:
    True / "group" divides by the group's std (+1e-4), "batch" by the whole batch's std (as
    Dr. GRPO / LitePPO suggest), False / "none" does not scale. NaN rewards (unscorable
    completions) are left out of the statistics and get advantage 0, as in TRL.
    """
    mode = _scaling_mode(scale_rewards)
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if mode == "group":
        std = _group_std(grouped, group_size)
        advantages = advantages / (std + _STD_EPS)
    elif mode == "batch":
        std = _nanstd(rewards, None) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std.view(-1) + _STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def _scaling_mode(scale_rewards: RewardScaling) -> str:
    """Booleans as TRL's old flag: True is per-group scaling, False none."""
    if isinstance(scale_rewards, bool):
        return "group" if scale_rewards else "none"
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale_rewards={scale_rewards!r}; use group, batch or none")
    return scale_rewards


def _group_std(grouped: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's std, repeated for its members; zero for groups of one (eval only)."""
    if group_size == 1:
        return torch.zeros(grouped.numel(), dtype=grouped.dtype, device=grouped.device)
    return _nanstd(grouped, 1).repeat_interleave(group_size)


def _clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic clipped objective per token, negated; and the ratio for the clip metrics."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def _k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = log ref - log pi; >= 0, unbiased."""
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


def _reduce_tokens(
    per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int | None
) -> torch.Tensor:
    """Per-sequence loss whose sum over sequences, over the right unit count, is TRL's batch loss."""
    token_sum = (per_token_loss * mask).sum(-1)
    if loss_type == "grpo":
        return token_sum / mask.sum(-1).clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss(loss_type='dr_grpo') needs max_completion_length")
        return token_sum / max_completion_length
    return token_sum


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: GRPOLossType = "grpo",
    max_completion_length: int | None = None,
) -> LossAndMetrics:
    """GRPO's clipped policy-gradient loss with a k3 KL penalty (Shao et al. 2024), per sequence.

    Per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta k3(pi, ref), with
    rho = exp(log pi - log pi_old) (pi_old = the detached policy when `old_per_token_logps` is
    None, i.e. one update per generation). Tensors are (B, T) over completion tokens; advantages
    (B,) or (B, T). What each sequence's loss is, and what the caller divides the SUM by to get
    TRL's batch loss:

    - grpo: the masked token mean of the sequence; divide by the number of sequences.
    - dr_grpo (Liu et al. 2025): token sum / max_completion_length; divide by the number of sequences.
    - bnpo / dapo: the token sum; divide by the number of completion tokens (TRL: the micro-batch's
      for bnpo, the whole generation batch's for dapo).

    Metrics are per-sequence token sums ("kl_sum", "clipped/low", "clipped/high", "clipped/region")
    and "tokens"; TRL's logged means are sum(metric) / sum("tokens").
    """
    if loss_type not in ("grpo", "dr_grpo", "bnpo", "dapo"):
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; use grpo, dr_grpo, bnpo or dapo")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    per_token_loss, ratio = _clipped_surrogate(per_token_logps - old, advantages, epsilon_low, epsilon_high)
    mask = completion_mask.to(per_token_loss.dtype)
    metrics: Metrics = {}
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_per_token_logps")
        per_token_kl = _k3_kl(per_token_logps, ref_per_token_logps)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl_sum"] = (per_token_kl.detach() * mask).sum(-1)
    losses = _reduce_tokens(per_token_loss, mask, loss_type, max_completion_length)
    metrics.update(_clip_metrics(ratio.detach(), advantages.detach(), mask, epsilon_low, epsilon_high))
    return losses, metrics


def _clip_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> Metrics:
    """Per-sequence counts of tokens whose update the clip switched off, by side."""
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
    region = torch.maximum(low, high)
    return {
        "clipped/low": (low * mask).sum(-1),
        "clipped/high": (high * mask).sum(-1),
        "clipped/region": (region * mask).sum(-1),
        "tokens": mask.sum(-1),
    }
