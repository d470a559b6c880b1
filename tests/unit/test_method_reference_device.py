"""A frozen reference copy follows its batches to their device (accelerate's prepare() moves only the policy).

No second device is needed to see it: the batch goes to the meta device, and the reference's
embedding reports where its weight is when the batch reaches it. A reference left on the CPU
receives meta inputs with CPU weights; one that followed its batch has meta weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunesmith.data.conversation import RowRef
from tunesmith.data.preference_tokenize import TokenizedPair
from tunesmith.training.methods.grpo import CompletionScorer
from tunesmith.training.methods.kto import KTOScorer
from tunesmith.training.methods.pairs import PairScorer, collate_pairs


class Reached(Exception):
    """Raised at the reference's embedding: a meta tensor holds no values, so scoring stops there."""


def _devices_seen(reference: torch.nn.Module) -> list[tuple[str, str]]:
    """(weight device, input device) of the reference's input embedding, at its first call."""
    seen: list[tuple[str, str]] = []
    embedding = reference.get_input_embeddings()

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append((module.weight.device.type, args[0].device.type))
        raise Reached

    embedding.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize(
    "make_scorer",
    [
        lambda policy, ref: PairScorer(policy, 16, ref),  # dpo
        lambda policy, ref: KTOScorer(policy, 16, ref),  # kto
        lambda policy, ref: CompletionScorer(policy, 16, 1.0, ref),  # grpo
    ],
    ids=["dpo", "kto", "grpo"],
)
def test_the_frozen_reference_moves_to_the_batch_device(make_scorer, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    scorer = make_scorer(policy, reference)
    pair = TokenizedPair([1, 5, 6], [7, 8, 9], [10, 11], RowRef("mem", 1))
    batch = {k: v.to("meta") for k, v in collate_pairs([pair], pad_id=2, block_mask="bool").tensors.items()}
    seen = _devices_seen(reference)

    with pytest.raises(Reached):
        scorer.reference_logps(**batch)

    assert seen == [("meta", "meta")]
    assert {p.device.type for p in reference.parameters()} == {"meta"}
    assert {p.device.type for p in policy.parameters()} == {"cpu"}  # the policy is the loop's to move
