"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023).

Algorithm 1 of the paper: for a sequence of L tokens with embeddings of width d,

    X_emb <- X_emb + alpha / sqrt(L d) * eps,    eps ~ Uniform(-1, 1) elementwise,

in training only; evaluation and generation see the clean embeddings. L is each sequence's real
length, not the padded width: with a 2-D attention mask L is the row's count of real tokens and
padding gets no noise; in a packed row (samples laid end to end, position ids restarting at 0 at
each sample) every sample is scaled by its own length, as if it were trained alone. The padding tail
of a packed row is scaled as one more segment; it carries no labels, so its noise reaches no loss.

Two hooks do it, both removable: a forward pre-hook on the module that owns the embedding (the
decoder, which receives `position_ids` and `attention_mask`) notes the batch layout, and a forward
hook on the embedding adds the noise when the embedding is in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class NEFTuneHandle:
    """What `attach_neftune` installed; `remove()` restores the model exactly."""

    alpha: float
    embedding: nn.Module
    _handles: list[Any] = field(default_factory=list)
    _layout: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._layout.clear()

    def __enter__(self) -> NEFTuneHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def noise_scale(
    shape: tuple[int, int],
    dim: int,
    alpha: float,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token factor alpha / sqrt(L d) (0 on padding), shape (batch, seq), from the batch layout."""
    batch, width = shape
    if position_ids is not None and position_ids.shape[-1] == width:
        lengths = _segment_lengths(position_ids.expand(batch, width))
    else:
        lengths = torch.full((batch, width), width, dtype=torch.long)
    mask = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == (batch, width):
        mask = attention_mask.to(torch.bool)
        if position_ids is None:  # padded rows: L is the real length of the row
            lengths = mask.sum(-1, keepdim=True).expand(batch, width)
    scale = alpha / torch.sqrt(lengths.clamp(min=1).to(torch.float32) * dim)
    if mask is not None:
        scale = scale * mask
    return scale


def _segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Length of the segment each token belongs to; a segment starts where the position does not grow by 1."""
    batch, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.cumsum(-1) - 1  # 0-based segment index of each token within its row
    counts = torch.zeros((batch, width), dtype=torch.long)
    counts.scatter_add_(1, segment, torch.ones_like(segment))
    return counts.gather(1, segment)


def attach_neftune(model: nn.Module, alpha: float) -> NEFTuneHandle:
    """Install NEFTune on `model`'s input embedding; active only while that embedding is training."""
    if alpha <= 0:
        raise ValueError(f"train.neftune_alpha must be > 0 (the paper uses 5-15), got {alpha}")
    embedding = model.get_input_embeddings()
    if embedding is None:
        raise ValueError(f"{type(model).__name__} has no input embedding to put NEFTune noise on")
    handle = NEFTuneHandle(alpha=alpha, embedding=embedding)
    owner = _owner_of(model, embedding)
    if owner is not None:
        handle._handles.append(owner.register_forward_pre_hook(_note_layout(handle), with_kwargs=True))

    def add_noise(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        layout = handle._layout
        scale = noise_scale(
            tuple(output.shape[:2]),
            output.shape[-1],
            alpha,
            position_ids=layout.get("position_ids"),
            attention_mask=layout.get("attention_mask"),
        ).to(device=output.device, dtype=output.dtype)
        noise = torch.zeros_like(output).uniform_(-1, 1)
        return output + noise * scale[..., None]

    handle._handles.append(embedding.register_forward_hook(add_noise))
    return handle


def _note_layout(handle: NEFTuneHandle) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        handle._layout["position_ids"] = kwargs.get("position_ids")
        handle._layout["attention_mask"] = kwargs.get("attention_mask")

    return hook


def _owner_of(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """The module whose direct child is the embedding (a decoder such as LlamaModel)."""
    for module in model.modules():
        if any(child is embedding for child in module.children()):
            return module
    return None
