"""Causal-LM loss that never builds the full `tokens x vocab` logits tensor.

Hidden states are gathered at labelled positions before the LM head, and the head plus
cross-entropy run in chunks under activation checkpointing, so at most one chunk of logits
exists at a time, forward or backward. Returns the *sum* of token losses and the token count,
so that gradient accumulation can normalise by the tokens of the whole optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.models.attention import packed_layer_masks, packed_mask_kind
from tunesmith.models.varlen_attention import flash_varlen_kwargs


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> torch.Tensor:
    """The LM head's logits in fp32 (losses are never taken from bf16 logits), soft-capped if the model does."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _head_ce_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    return F.cross_entropy(head_logits(hidden, weight, bias, softcap), targets, reduction="sum")


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Linear,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over positions whose target is labelled, and how many there are."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    flat_hidden = hidden[:, :-1][selected]
    flat_targets = targets[selected]
    count = selected.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    if flat_targets.numel() == 0:
        return total + 0.0 * hidden.sum(), count  # keeps the graph connected for DDP
    weight, bias = lm_head.weight, lm_head.bias
    for start in range(0, flat_targets.numel(), chunk_size):
        h = flat_hidden[start : start + chunk_size]
        t = flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and flat_targets.numel() > chunk_size:
            total = total + checkpoint(_head_ce_sum, h, t, weight, bias, softcap, use_reentrant=False)
        else:
            total = total + _head_ce_sum(h, t, weight, bias, softcap)
    return total, count


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None]:
    """The decoder stack, the LM head and any final-logit soft-capping of a (PEFT-wrapped) causal LM."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal.get_decoder()
    head = causal.get_output_embeddings()
    config = causal.config
    softcap = getattr(config, "final_logit_softcapping", None) or getattr(
        getattr(config, "text_config", None), "final_logit_softcapping", None
    )
    unsupported = [
        a for a in ("logit_scale", "logits_scaling") if getattr(config, a, None) not in (None, 1, 1.0)
    ]
    if unsupported:
        raise NotImplementedError(
            f"{type(causal).__name__}: logit scaling ({unsupported}) is not supported yet"
        )
    return decoder, head, softcap


class CausalLMWithLoss(nn.Module):
    """Wraps a causal LM so that one forward call returns (loss_sum, token_count).

    Being the module that accelerate prepares (DDP/FSDP), it keeps gradient
    synchronisation intact while the loss bypasses the model's full-logits head.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        decoder, head, softcap = causal_lm_parts(model)
        # A tuple, not attributes: the parts are already registered under `self.model`.
        self._parts = (decoder, head, softcap)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, head, softcap = self._parts
        hidden = self.hidden_states(input_ids, **inputs)
        return chunked_lm_loss_sum(hidden, labels, head, self.chunk_size, softcap)

    def hidden_states(self, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """The decoder's last hidden states, with packed rows isolated the way its kernel needs."""
        decoder = self._parts[0]
        inputs = attention_inputs(decoder.config, inputs)
        return decoder(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state


def attention_inputs(config: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with a packed row's 4-D mask narrowed to each layer's sliding window.

    transformers uses a ready 4-D mask as it is, for every layer, so the window (Mistral, Qwen2,
    Gemma 2/3) has to be in it already. Varlen kernels find samples from position ids alone, so a
    packed batch without them would silently run as one sample per row: refused.
    """
    implementation = getattr(config, "_attn_implementation", None)
    mask = inputs.get("attention_mask")
    packed = mask is not None and mask.dim() == 4
    if packed_mask_kind(implementation) == "none":
        position_ids = inputs.get("position_ids")
        if position_ids is None and (mask is None or packed):
            raise ValueError(
                f"attention {implementation!r} finds packed samples from position_ids, and this batch has "
                "none; give each sample position ids that restart at 0 (data.packing does), or a 2-D "
                "attention_mask for one sample per row"
            )
        if implementation == "flash_attention_2" and position_ids is not None and mask is None:
            return {**inputs, **flash_varlen_kwargs(position_ids)}
        return inputs
    if packed and implementation in ("sdpa", "eager"):
        return {**inputs, "attention_mask": packed_layer_masks(config, mask, implementation)}
    return inputs
