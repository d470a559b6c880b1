"""The frozen reference copy of full and freeze tuning, kept on the device its batches come from.

The copy is made in `wrap_model`, before accelerate's `prepare()`, and held outside the module
tree (so it is not trained, prepared or checkpointed); `prepare()` therefore moves only the policy
to the accelerator, and the copy would stay where it was built. Every reference pass goes through
`follow_batch`, which moves the copy, once, to the device of the batch it scores.
"""

from __future__ import annotations

import torch
from torch import nn


def follow_batch(reference: nn.Module, batch: dict[str, torch.Tensor]) -> nn.Module:
    """`reference`, moved to the device of `batch["input_ids"]` if its weights are elsewhere."""
    device = batch["input_ids"].device
    weight = next(reference.parameters(), None)
    if weight is not None and weight.device != device:
        reference.to(device)
    return reference
