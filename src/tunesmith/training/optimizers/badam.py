"""BAdam (Luo et al., 2024, arXiv:2404.02827): block coordinate descent with Adam for full fine-tuning.

The model's decoder layers are the blocks. Only the active block is updated, by AdamW; after
`switch_every` steps the next block becomes active and the old block's Adam state is dropped (the
paper's "reset": each block starts with fresh moments and bias correction). Memory: Adam state for
one block instead of the whole model, and gradients of the other blocks are freed the moment
backward produces them (a post-accumulate hook), so they never live together.

Every parameter keeps `requires_grad=True`: checkpoints and the saved model hold the whole model,
and a resume sees the same trainable set. Which block is active and how many steps it has had
are part of the state dict, so a resumed run continues in the same block at the same step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_blocks(named: Sequence[tuple[str, torch.nn.Parameter]]) -> tuple[list[list[int]], list[int]]:
    """Indices (into `named`) of each decoder layer's parameters, in layer order, and of the rest."""
    by_layer: dict[int, list[int]] = {}
    rest: list[int] = []
    for i, (name, _) in enumerate(named):
        match = _LAYER.search(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(i)
        else:
            rest.append(i)
    return [by_layer[k] for k in sorted(by_layer)], rest


class BAdam(torch.optim.AdamW):
    """AdamW over every parameter, stepping only the active block (and `always_active` ones).

    `blocks` are lists of parameters; parameters in no block and not always active are never
    updated. `switch_mode` random draws a permutation of the blocks per round from `seed` and the
    round number, so the order needs no RNG state to resume.
    """

    def __init__(
        self,
        params: Any,
        blocks: Sequence[Sequence[torch.nn.Parameter]],
        always_active: Sequence[torch.nn.Parameter] = (),
        switch_every: int = 50,
        switch_mode: str = "random",
        seed: int = 0,
        **adamw: Any,
    ) -> None:
        super().__init__(params, **adamw)
        if not blocks:
            raise ValueError(
                "BAdam found no decoder layers (parameter names with layers.N.) to use as blocks"
            )
        self.blocks = [list(block) for block in blocks]
        self.always_active = {id(p) for p in always_active}
        self.switch_every, self.switch_mode, self.seed = switch_every, switch_mode, seed
        self.round, self.position, self.steps_in_block = 0, 0, 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._drop_if_inactive)
            for g in self.param_groups
            for p in g["params"]
        ]
        self._activate()

    def order(self, round_index: int) -> list[int]:
        n = len(self.blocks)
        if self.switch_mode == "ascending":
            return list(range(n))
        if self.switch_mode == "descending":
            return list(range(n - 1, -1, -1))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return torch.randperm(n, generator=generator).tolist()

    @property
    def active_block(self) -> int:
        return self.order(self.round)[self.position]

    def _activate(self) -> None:
        self._active = {id(p) for p in self.blocks[self.active_block]} | self.always_active

    def _drop_if_inactive(self, p: torch.Tensor) -> None:
        if id(p) not in self._active:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        self.steps_in_block += 1
        if self.steps_in_block >= self.switch_every:
            for p in self.blocks[self.active_block]:
                if id(p) not in self.always_active:
                    self.state.pop(p, None)  # the next visit to this block starts Adam afresh
            self.steps_in_block = 0
            self.position += 1
            if self.position == len(self.blocks):
                self.round, self.position = self.round + 1, 0
            self._activate()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["badam"] = {
            "round": self.round,
            "position": self.position,
            "steps_in_block": self.steps_in_block,
            "blocks": len(self.blocks),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("badam")
        if saved["blocks"] != len(self.blocks):
            raise ValueError(
                f"the checkpoint has {saved['blocks']} BAdam blocks, this model {len(self.blocks)}"
            )
        super().load_state_dict(state_dict)
        self.round, self.position = saved["round"], saved["position"]
        self.steps_in_block = saved["steps_in_block"]
        self._activate()
