"""Preference and RL losses equal TRL's on the same inputs: batch loss, gradients and metrics.

TRL's losses live inside trainer methods that run the model; each is called here unbound, with a
stand-in `self` carrying only the attributes it reads and a stand-in model returning given
per-token log-probs. Our per-example losses, summed and divided by the unit count, must match.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunesmith.training.methods.preference_losses import (
    bradley_terry_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)

pytest.importorskip("trl")

TOL = 1e-6
BATCH_SIZES = (1, 5)


def _trl(module: str, name: str) -> Any:
    """A TRL trainer class, imported on first use (the import costs seconds)."""
    return getattr(pytest.importorskip(module), name)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> None:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    assert diff <= tol * max(1.0, theirs.abs().max().item()), f"max diff {diff}"


def _assert_same_grads(ours: torch.Tensor, theirs: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """Same value and same gradient w.r.t. every leaf; the gradient must not be all zero."""
    _assert_close(ours, theirs)
    ours_g = torch.autograd.grad(ours, leaves, retain_graph=True)
    theirs_g = torch.autograd.grad(theirs, leaves, retain_graph=True)
    for a, b in zip(ours_g, theirs_g, strict=True):
        assert b.abs().sum() > 0
        _assert_close(a, b)


def _accelerator() -> SimpleNamespace:
    """One process: gathers and reductions are the identity."""

    def same(x: Any, *args: Any, **kwargs: Any) -> Any:
        return x

    return SimpleNamespace(
        device=torch.device("cpu"),
        gather=same,
        gather_for_metrics=same,
        reduce=same,
        unwrap_model=same,
        num_processes=1,
        process_index=0,
        sync_gradients=True,
    )


def _trainer_self(**attrs: Any) -> SimpleNamespace:
    """What every TRL trainer method here reads, plus the method's own attributes."""
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**{**base, **attrs})


def _completion_mask(rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, length) 0/1: a prompt of >= 1 token, then a completion of >= 1 token, then padding."""
    mask = torch.zeros(rows, length)
    for i in range(rows):
        start = int(torch.randint(1, length // 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        mask[i, start:end] = 1
    return mask


def _lm_outputs(log_probs: torch.Tensor) -> SimpleNamespace:
    """What TRL's fused LM head returns, with neutral values for what only feeds logging."""
    zeros = torch.zeros_like(log_probs.detach())
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


# ----------------------------------------------------------------------------------------- DPO


def _dpo_case(batch: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(2 * batch, length, gen)
    raw = (-3 * torch.rand(2 * batch, length - 1, generator=gen)).requires_grad_()
    ref = (raw.detach() * mask[:, 1:]).sum(1) + torch.randn(2 * batch, generator=gen)
    return {"mask": mask, "raw": raw, "ref": ref}


def _trl_dpo(case: dict[str, torch.Tensor], **attrs: Any) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's DPOTrainer._compute_loss on precomputed reference log-probs."""
    trainer = _trl("trl.trainer.dpo_trainer", "DPOTrainer")
    shift_mask = case["mask"][:, 1:]

    def model(**kwargs: Any) -> SimpleNamespace:
        return _lm_outputs(case["raw"] * shift_mask)

    ref_chosen, ref_rejected = case["ref"].chunk(2)
    inputs = {
        "input_ids": torch.ones_like(case["mask"], dtype=torch.long),
        "attention_mask": torch.ones_like(case["mask"], dtype=torch.long),
        "completion_mask": case["mask"].long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    defaults = dict(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        label_smoothing=0.0,
        use_weighting=False,
    )
    stand_in = _trainer_self(**{**defaults, **attrs})
    loss = trainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, stand_in._metrics["train"]


def _ours_dpo(case: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    shift_mask = case["mask"][:, 1:]
    logps = (case["raw"] * shift_mask).sum(1)
    lengths = shift_mask.sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = case["ref"].chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    return dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        **kwargs,
    )


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_dpo_matches_trl(batch: int, loss_type: str, label_smoothing: float) -> None:
    case = _dpo_case(batch, seed=batch)
    beta = 0.3 if loss_type != "hinge" else 0.05  # hinge: keep some pairs inside the margin
    theirs, trl_metrics = _trl_dpo(
        case, beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing
    )
    losses, metrics = _ours_dpo(case, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert losses.shape == (batch,)
    _assert_same_grads(losses.sum() / batch, theirs, [case["raw"]])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].shape == (batch,)
        assert math.isclose(
            metrics[key].sum().item() / batch, trl_metrics[key][-1], rel_tol=1e-6, abs_tol=1e-6
        )


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_rpo_term_matches_trl_sft_loss(batch: int) -> None:
    """TRL 1.x writes RPO as loss_type=[sigmoid, sft]: the chosen NLL averaged over all chosen tokens."""
    case = _dpo_case(batch, seed=10 + batch)
    alpha = 0.7
    theirs, _ = _trl_dpo(case, beta=0.1, loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha])
    chosen_tokens = case["mask"][:batch, 1:].sum()
    losses, metrics = _ours_dpo(case, beta=0.1, rpo_alpha=alpha, rpo_tokens_per_pair=chosen_tokens / batch)
    plain, _ = _ours_dpo(case, beta=0.1)
    assert (losses - plain).abs().min() > 0  # the NLL term is there
    _assert_same_grads(losses.sum() / batch, theirs, [case["raw"]])
    assert metrics["nll_loss"].shape == (batch,)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_conservative_dpo_matches_trl_cpo_form(batch: int) -> None:
    """cDPO is CPO's smoothed sigmoid applied to log-ratios; TRL's cpo_loss is the reference form."""
    trainer = _trl("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
    gen = torch.Generator().manual_seed(20 + batch)
    leaves = [(-20 * torch.rand(batch, generator=gen)).requires_grad_() for _ in range(2)]
    ref_chosen, ref_rejected = -20 * torch.rand(2, batch, generator=gen)
    beta, eps = 0.2, 0.15
    stand_in = _trainer_self(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    trl_losses, _, _ = trainer.cpo_loss(stand_in, leaves[0] - ref_chosen, leaves[1] - ref_rejected)
    losses, _ = dpo_loss(
        leaves[0], leaves[1], ref_chosen, ref_rejected, beta=beta, loss_type="sigmoid", label_smoothing=eps
    )
    _assert_same_grads(losses.mean(), trl_losses.mean(), leaves)


def test_dpo_at_the_reference_costs_ln2_with_zero_rewards() -> None:
    policy_chosen = torch.tensor([-12.0, -3.5, -40.0], requires_grad=True)
    policy_rejected = torch.tensor([-9.0, -7.25, -1.0], requires_grad=True)
    beta = 0.25
    losses, metrics = dpo_loss(
        policy_chosen, policy_rejected, policy_chosen.detach(), policy_rejected.detach(), beta=beta
    )
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(metrics[key], torch.zeros(3))
    grad_chosen, grad_rejected = torch.autograd.grad(losses.sum(), [policy_chosen, policy_rejected])
    torch.testing.assert_close(grad_chosen, torch.full((3,), -beta / 2))  # d/dh -log s(beta h) at 0
    torch.testing.assert_close(grad_rejected, torch.full((3,), beta / 2))


def test_dpo_rewards_are_beta_times_log_ratios() -> None:
    losses, metrics = dpo_loss(
        torch.tensor([-1.0, -6.0]), torch.tensor([-5.0, -2.0]), torch.tensor([-3.0, -3.0]),
        torch.tensor([-3.0, -3.0]), beta=0.5,
    )  # fmt: skip
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([1.0, -1.5]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-1.0, 0.5]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([2.0, -2.0])))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "ipo"}, "chosen_lengths"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no label smoothing"),
        ({"loss_type": "kto"}, "unknown loss_type"),
        ({"rpo_alpha": 1.0}, "rpo_tokens_per_pair"),
    ],
)
def test_dpo_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, beta=0.1, **kwargs)


# ------------------------------------------------------------------------------ SimPO and ORPO


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(batch: int, label_smoothing: float) -> None:
    trainer = _trl("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
    gen = torch.Generator().manual_seed(30 + batch)
    leaves = [(-3 * torch.rand(batch, generator=gen)).requires_grad_() for _ in range(2)]
    beta, gamma = 2.0, 0.8
    stand_in = _trainer_self(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing
    )
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(stand_in, *leaves)
    losses, metrics = simpo_loss(*leaves, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    _assert_same_grads(losses.mean(), trl_losses.mean(), leaves)
    _assert_close(metrics["rewards/chosen"], trl_chosen)
    _assert_close(metrics["rewards/rejected"], trl_rejected)


def test_simpo_margin_shifts_the_logit() -> None:
    losses, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([0.0])))


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_orpo_matches_trl(batch: int) -> None:
    trainer = _trl("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
    gen = torch.Generator().manual_seed(40 + batch)
    leaves = [(-4 * torch.rand(batch, generator=gen) - 1e-3).requires_grad_() for _ in range(2)]
    stand_in = _trainer_self(beta=0.1)
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(stand_in, *leaves)
    losses, metrics = orpo_loss(*leaves, beta=0.1)
    _assert_same_grads(losses.mean(), -trl_losses.mean(), leaves)  # TRL's loss is nll - term.mean()
    _assert_close(metrics["rewards/chosen"], trl_chosen)
    _assert_close(metrics["rewards/rejected"], trl_rejected)
    _assert_close(metrics["log_odds_ratio"].mean(), trl_ratio)
    _assert_close(metrics["log_odds_chosen"].mean(), trl_log_odds)


def test_log1mexp_is_accurate_at_both_ends() -> None:
    x = torch.tensor([-1e-7, -1e-3, -0.5, -math.log(2), -1.0, -30.0, -100.0], dtype=torch.float64)
    expected = torch.log(-torch.expm1(x))  # float64: exact enough here
    _assert_close(log1mexp(x.float()), expected, tol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-20, -200.0]))).all()


# ----------------------------------------------------------------------------------------- KTO


def _kto_case(labels: list[bool], kl_offset: float, seed: int, length: int = 10) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    rows = len(labels)
    mask, kl_mask = _completion_mask(rows, length, gen), _completion_mask(rows, length + 2, gen)
    raw = (-3 * torch.rand(rows, length - 1, generator=gen)).requires_grad_()
    kl_raw = -3 * torch.rand(rows, length + 1, generator=gen)
    kl_policy = (kl_raw * kl_mask[:, 1:]).sum(1)
    return {
        "labels": torch.tensor(labels),
        "mask": mask,
        "kl_mask": kl_mask,
        "raw": raw,
        "kl_raw": kl_raw,
        "ref": (raw.detach() * mask[:, 1:]).sum(1) + torch.randn(rows, generator=gen),
        "kl_policy": kl_policy,
        "kl_ref": kl_policy - kl_offset + 0.5 * torch.randn(rows, generator=gen),
    }


def _trl_kto(case: dict[str, Any], **attrs: Any) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's KTOTrainer._compute_loss on precomputed reference log-probs, KL term on."""
    trainer = _trl("trl.trainer.kto_trainer", "KTOTrainer")
    kl_ids = torch.ones_like(case["kl_mask"], dtype=torch.long)

    def model(**kwargs: Any) -> SimpleNamespace:
        if kwargs["input_ids"] is kl_ids:
            return _lm_outputs(case["kl_raw"] * case["kl_mask"][:, 1:])
        return _lm_outputs(case["raw"] * case["mask"][:, 1:])

    inputs = {
        "input_ids": torch.ones_like(case["mask"], dtype=torch.long),
        "attention_mask": torch.ones_like(case["mask"], dtype=torch.long),
        "completion_mask": case["mask"].long(),
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": case["kl_mask"].long(),
        "label": case["labels"],
        "ref_logps": case["ref"],
        "ref_KL_logps": case["kl_ref"],
    }
    stand_in = _trainer_self(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", **attrs)
    stand_in._compute_kl_logps = lambda m, batch: trainer._compute_kl_logps(stand_in, m, batch)
    loss = trainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, stand_in._metrics["train"]


@pytest.mark.parametrize(
    ("labels", "kl_offset"),
    [
        ([True], 2.0),
        ([True, False, False, True, False], 2.0),
        ([False, True, True], -2.0),
        ([True, True], 1.0),
    ],
)
def test_kto_matches_trl(labels: list[bool], kl_offset: float) -> None:
    case = _kto_case(labels, kl_offset, seed=len(labels))
    weights = dict(desirable_weight=1.3, undesirable_weight=0.7)
    theirs, trl_metrics = _trl_kto(case, beta=0.2, **weights)
    kl = kto_kl_estimate(case["kl_policy"], case["kl_ref"])
    assert (kl > 0) == (kl_offset > 0)  # a negative estimate is clamped to 0
    policy_logps = (case["raw"] * case["mask"][:, 1:]).sum(1)
    losses, metrics = kto_loss(policy_logps, case["ref"], case["labels"], kl, beta=0.2, **weights)
    _assert_same_grads(losses.sum() / len(labels), theirs, [case["raw"]])
    assert math.isclose(kl.item(), trl_metrics["kl"][-1], abs_tol=1e-6)
    chosen = metrics["rewards/chosen"].sum() / metrics["count/chosen"].sum()
    assert math.isclose(chosen.item(), trl_metrics["rewards/chosen"][-1], rel_tol=1e-6, abs_tol=1e-6)
    if not all(labels):
        rejected = metrics["rewards/rejected"].sum() / metrics["count/rejected"].sum()
        assert math.isclose(rejected.item(), trl_metrics["rewards/rejected"][-1], rel_tol=1e-6, abs_tol=1e-6)


def test_kto_reference_point_carries_no_gradient() -> None:
    kl = torch.tensor(0.5, requires_grad=True)
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0, -3.0]), torch.tensor([True, False]), kl, beta=1.0)
    assert torch.autograd.grad(losses.sum(), [kl], allow_unused=True)[0] is None
    # At r = 0, desirable: 1 - s(-0.5); undesirable: 1 - s(0.5)
    torch.testing.assert_close(losses, 1 - torch.sigmoid(torch.tensor([-0.5, 0.5])))


# ------------------------------------------------------------------------------ reward models


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(("use_margin", "center"), [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl(batch: int, use_margin: bool, center: float | None) -> None:
    trainer = _trl("trl.trainer.reward_trainer", "RewardTrainer")
    gen = torch.Generator().manual_seed(50 + batch)
    chosen, rejected = (torch.randn(batch, generator=gen).requires_grad_() for _ in range(2))
    margin = torch.rand(batch, generator=gen) if use_margin else None
    inputs: dict[str, Any] = {"attention_mask": torch.ones(2 * batch, 4, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    stand_in = _trainer_self(args=SimpleNamespace(center_rewards_coefficient=center))

    def model(**kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])

    theirs = trainer.compute_loss(stand_in, model, inputs)
    losses, metrics = bradley_terry_loss(chosen, rejected, margin, center_rewards_coefficient=center)
    _assert_same_grads(losses.sum() / batch, theirs, [chosen, rejected])
    trl_metrics = stand_in._metrics["train"]
    assert math.isclose(metrics["accuracy"].mean().item(), trl_metrics["accuracy"][-1], abs_tol=1e-7)
    assert math.isclose(
        metrics["margin"].mean().item(), trl_metrics["margin"][-1], rel_tol=1e-6, abs_tol=1e-6
    )


# ---------------------------------------------------------------------------------------- GRPO


def _grpo_case(batch: int, seed: int, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length)
    for i in range(batch):
        mask[i, : int(torch.randint(1, length + 1, (1,), generator=gen))] = 1
    logps = (-2 * torch.rand(batch, length, generator=gen)).requires_grad_()
    return {
        "mask": mask,
        "logps": logps,
        "old": logps.detach() + 0.3 * torch.randn(batch, length, generator=gen),  # some ratios clip
        "ref": logps.detach() + 0.5 * torch.randn(batch, length, generator=gen),
        "advantages": torch.randn(batch, generator=gen),
    }


def _trl_grpo(case: dict[str, torch.Tensor], with_old: bool, **attrs: Any) -> tuple[torch.Tensor, Any]:
    """TRL's GRPOTrainer._compute_loss with the per-token log-probs handed in."""
    trainer = _trl("trl.trainer.grpo_trainer", "GRPOTrainer")
    batch, length = case["mask"].shape

    def per_token_logps(
        model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int, **kw: Any
    ) -> Any:
        assert logits_to_keep == length
        return case["logps"], torch.zeros_like(case["mask"]), None

    inputs = {
        "prompt_ids": torch.ones(batch, 3, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 3, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": case["mask"].long(),
        "advantages": case["advantages"],
        "ref_per_token_logps": case["ref"],
        "num_items_in_batch": case["mask"].sum(),
    }
    if with_old:
        inputs["old_per_token_logps"] = case["old"]
    stand_in = _trainer_self(
        _get_per_token_logps_and_entropies=per_token_logps,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        **attrs,
    )
    return trainer._compute_loss(stand_in, None, inputs), stand_in._metrics["train"]


@pytest.mark.parametrize("batch", (1, 6))
@pytest.mark.parametrize(
    ("loss_type", "beta", "with_old"),
    [
        ("grpo", 0.04, True),
        ("grpo", 0.0, False),
        ("dr_grpo", 0.04, True),
        ("bnpo", 0.1, True),
        ("dapo", 0.0, True),
    ],
)
def test_grpo_matches_trl(batch: int, loss_type: str, beta: float, with_old: bool) -> None:
    case = _grpo_case(batch, seed=60 + batch)
    eps = dict(epsilon_low=0.2, epsilon_high=0.28)
    theirs, trl_metrics = _trl_grpo(
        case, with_old, loss_type=loss_type, beta=beta, max_completion_length=12, **eps
    )
    losses, metrics = grpo_loss(
        case["logps"],
        case["old"] if with_old else None,
        case["ref"],
        case["advantages"],
        case["mask"],
        beta=beta,
        loss_type=loss_type,
        max_completion_length=12,
        **eps,
    )
    assert losses.shape == (batch,)
    units = batch if loss_type in ("grpo", "dr_grpo") else metrics["tokens"].sum()
    _assert_same_grads(losses.sum() / units, theirs, [case["logps"]])
    tokens = metrics["tokens"].sum().item()
    if beta:
        assert math.isclose(metrics["kl_sum"].sum().item() / tokens, trl_metrics["kl"][-1], rel_tol=1e-6)
    for ours_key, trl_key in (("clipped/low", "low_mean"), ("clipped/high", "high_mean")):
        ours_mean = metrics[ours_key].sum().item() / tokens
        assert math.isclose(ours_mean, trl_metrics[f"clip_ratio/{trl_key}"][-1], rel_tol=1e-6, abs_tol=1e-7)
    if with_old:
        assert metrics["clipped/region"].sum() > 0  # the clip was exercised


def test_grpo_on_policy_loss_is_minus_mean_advantage() -> None:
    """rho = 1 with no KL: each sequence's loss is -A, its gradient -A per token (mean over tokens)."""
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([2.0, -1.0])
    losses, _ = grpo_loss(logps, None, None, advantages, mask)
    torch.testing.assert_close(losses, -advantages)
    (grad,) = torch.autograd.grad(losses.sum(), [logps])
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def _trl_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """TRL's GRPO advantage steps (inline in its generation code), with TRL's own nanstd."""
    nanstd = _trl("trl.trainer.utils", "nanstd")
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize(("scale", "trl_scale"), [(True, "group"), ("batch", "batch"), (False, "none")])
def test_group_advantages_match_trl(scale: Any, trl_scale: str) -> None:
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(70))
    rewards[4:8] = 0.5  # a constant group
    rewards[9] = float("nan")  # an unscorable completion
    ours = group_advantages(rewards, group_size=4, scale_rewards=scale)
    _assert_close(ours, _trl_advantages(rewards, 4, trl_scale))
    torch.testing.assert_close(ours[4:8], torch.zeros(4))
    assert ours[9] == 0
    assert ours[:4].abs().sum() > 0
    if scale is True:  # each scored group is standardised
        torch.testing.assert_close(ours[:4].std(), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_group_advantages_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="use group, batch or none"):
        group_advantages(torch.zeros(4), group_size=2, scale_rewards="std")
