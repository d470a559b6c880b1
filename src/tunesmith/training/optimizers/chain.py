"""Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest).

The loop, the lr scheduler and the checkpoints see one `torch.optim.Optimizer`: `param_groups` is
the children's groups themselves (an lr set by the scheduler reaches the child), `state` merges the
children's, and the state dict holds one state dict per child.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class OptimizerChain(torch.optim.Optimizer):
    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for optimizer in getattr(self, "optimizers", []):
            merged.update(optimizer.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns one; the children own theirs
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chain": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict["chain"]
        if len(parts) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(parts)} optimizers, this run builds {len(self.optimizers)}"
            )
        for optimizer, part in zip(self.optimizers, parts, strict=True):
            optimizer.load_state_dict(part)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
