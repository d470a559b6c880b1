"""GaLore and APOLLO: Adam whose moments live in a low-rank projection of each weight's gradient.

Written here rather than taken from `galore-torch` / `apollo-torch` because those keep a Python
projector object in the optimizer state: `torch.load(weights_only=True)`, which every checkpoint
load uses, refuses it, so a run with them could not resume. Here the state is tensors and ints
only. The update rules follow the packages' AdamW step by step (tests compare both on the same
gradients).

Parameter groups with a `rank` key are projected; every other group is plain AdamW (with the
packages' un-fused formula, so a run is one optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


def _adam_moments(state: dict[str, Any], grad: torch.Tensor, beta1: float, beta2: float, eps: float) -> float:
    """Update Adam's moments in place; return the bias-corrected step factor sqrt(1-b2^t)/(1-b1^t)."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])


def _side(shape: torch.Size, proj_type: str) -> str:
    """'right' projects the columns (grad @ P.T), 'left' the rows (P.T @ grad); std: the shorter side."""
    if proj_type == "std":
        return "right" if shape[0] >= shape[1] else "left"
    return proj_type


def _project(grad: torch.Tensor, ortho: torch.Tensor, side: str) -> torch.Tensor:
    return grad @ ortho.t() if side == "right" else ortho.t() @ grad


def _project_back(low: torch.Tensor, ortho: torch.Tensor, side: str) -> torch.Tensor:
    return low @ ortho if side == "right" else ortho @ low


def _projected(group: dict[str, Any], p: torch.Tensor) -> bool:
    return "rank" in group and p.ndim == 2 and min(p.shape) > group["rank"]


class GaLoreAdamW(torch.optim.Optimizer):
    """GaLore (Zhao et al., 2024, arXiv:2403.03507), Algorithm 2 with Adam.

    Every `update_proj_gap` steps P_t comes from the SVD of the gradient G_t = U S V^T (P = U[:, :r]
    or V^T[:r]); R_t = P^T G_t; Adam's moments M, V are kept for R_t (r x n instead of m x n); the
    weight moves by  -lr * scale * P N_t  with  N_t = M_hat / (sqrt(V_hat) + eps).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _ortho(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        ortho = vh[:rank, :] if side == "right" else u[:, :rank]
        return ortho.to(grad.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                grad = p.grad
                projected = _projected(group, p)
                if projected:
                    side = _side(p.shape, group.get("proj_type", "std"))
                    if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                        state["ortho"] = self._ortho(grad, group["rank"], side)
                    grad = _project(grad, state["ortho"], side)
                factor = _adam_moments(state, grad, beta1, beta2, group["eps"])
                update = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])
                if projected:
                    update = _project_back(update, state["ortho"], side) * group["scale"]
                p.add_(update, alpha=-group["lr"] * factor)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def stable_randn(shape: tuple[int, int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def next_seed(seed: int, advance: int = 0xF) -> int:
    """The seed of a weight's next random projection, derived from the last one (as apollo-torch does)."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=generator)[-1])


class Apollo(torch.optim.Optimizer):
    """APOLLO (Zhu et al., 2024, arXiv:2412.05270): SGD with Adam's per-channel learning rate.

    A seeded Gaussian P (r x n, entries N(0, 1/r)), redrawn every `update_proj_gap` steps, projects
    the gradient: R = G P^T. Adam's moments of R give N = M_hat / (sqrt(V_hat) + eps); the channel j
    of the full gradient is scaled by s_j = ||N_j|| / ||R_j||  (scale_type tensor: one s for the
    whole weight, APOLLO-Mini). With the norm-growth limiter, an update's norm is at most 1.01x the
    previous one. The weight moves by  -lr * sqrt(scale) * G * s.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1  # each weight's first projection seed: its 1-based position
                if p.requires_grad:
                    self.state[p]["seed"] = index

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                grad = p.grad
                projected = _projected(group, p)
                if projected:
                    side = _side(p.shape, group.get("proj_type", "std"))
                    if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                        shape = (
                            (group["rank"], p.shape[1]) if side == "right" else (p.shape[0], group["rank"])
                        )
                        state["ortho"] = (
                            stable_randn(shape, state["seed"], p.device, torch.float32)
                            .div_(math.sqrt(group["rank"]))
                            .to(grad.dtype)
                        )
                        state["seed"] = next_seed(state["seed"])
                    grad = _project(grad, state["ortho"], side)
                factor = _adam_moments(state, grad, beta1, beta2, group["eps"])
                update = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])
                if projected:
                    update = self._channel_scaled(group, state, p.grad, grad, update, side)
                p.add_(update, alpha=-group["lr"] * factor)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    @staticmethod
    def _channel_scaled(
        group: dict[str, Any],
        state: dict[str, Any],
        full_grad: torch.Tensor,
        low: torch.Tensor,
        update: torch.Tensor,
        side: str,
    ) -> torch.Tensor:
        if group["scale_type"] == "tensor":
            scaling = update.norm() / (low.norm() + 1e-8)
        else:  # channels: rows of a right projection, columns of a left one
            dim = 1 if side == "right" else 0
            scaling = update.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
            if dim == 1:
                scaling = scaling.unsqueeze(1)
        scaled = full_grad * scaling
        if group["norm_growth_limit"]:
            norm = scaled.norm()
            if "scaled_norm" in state:
                limiter = torch.clamp(norm / (state["scaled_norm"] + 1e-8), min=1.01) / 1.01
                scaled = scaled / limiter
                state["scaled_norm"] = norm / limiter
            else:
                state["scaled_norm"] = norm
        return scaled * math.sqrt(group["scale"])
