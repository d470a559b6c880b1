"""Packed rows give every sample the loss it has alone, also under sliding windows and logit soft-caps.

Each sample is compared with the plain transformers model (eager) run on that sample alone, so the
reference applies the window and the soft-cap exactly the way transformers does. Samples are longer
than the window, so a mask that ignored the window would attend too far back.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed, pack_first_fit_decreasing
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import attention_for_model, choose_attention, packed_mask_kind
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.models.varlen_attention import register_varlen_sdpa, varlen_sdpa_forward
from tunesmith.training.losses import CausalLMWithLoss, chunked_lm_loss_sum

VOCAB = 300
WINDOW = 6
TOLERANCE = dict(rtol=1e-6, atol=1e-6)
"""fp32, losses ~6: measured at most 9.5e-7 apart (about 7e-6 allowed). A window left out of the mask
moves them by 0.05-0.27, Gemma 2's attention soft-cap left out of the varlen kernel by 4e-3."""

WINDOWED = {
    "mistral": dict(sliding_window=WINDOW),
    # Layer 0 full, layer 1 sliding.
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    # Alternating sliding / full layers, attention and final logits soft-capped.
    "gemma2": dict(
        sliding_window=WINDOW,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=3.0,
        head_dim=16,
        query_pre_attn_scalar=16,
    ),
    # Alternating layers with sdpa too (transformers' Gemma 3 loads with sdpa; its attention is not capped).
    "gemma3_text": dict(
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        head_dim=16,
        query_pre_attn_scalar=16,
    ),
}


def _config(arch: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **WINDOWED[arch],
    )


def _model(arch: str, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    register_varlen_sdpa()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _config(arch), dtype=torch.float32, attn_implementation=attention
    )
    for parameter in model.parameters():  # larger weights: scores reach the soft-cap
        parameter.data.mul_(3.0)
    return model.eval()


def _samples(count: int = 7, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = rng.randint(3 * WINDOW, 6 * WINDOW) if i % 3 else rng.randint(3, WINDOW)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        labels = [IGNORE_INDEX] + ids[1:]
        out.append(TokenizedSample(ids, labels, RowRef("mem", i + 1)))
    return out


def _alone_losses(arch: str, samples: list[TokenizedSample], weights: dict[str, torch.Tensor]) -> list[float]:
    """Mean next-token loss of each sample run alone through the plain transformers model."""
    reference = _model(arch, "eager")
    reference.load_state_dict(weights)
    with torch.no_grad():
        return [
            float(reference(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss)
            for s in samples
        ]


def _packed_losses(
    wrapped: CausalLMWithLoss, rows: list[list[TokenizedSample]], batch: dict[str, torch.Tensor]
) -> list[float]:
    """Mean loss of each sample, read from one forward over the packed rows."""
    _, head, softcap = wrapped._parts
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        hidden = wrapped.hidden_states(**inputs)
        out = []
        for r, row in enumerate(rows):
            offset = 0
            for sample in row:
                span = slice(offset, offset + len(sample.input_ids))
                total, count = chunked_lm_loss_sum(
                    hidden[r : r + 1, span], batch["labels"][r : r + 1, span], head, 16, softcap
                )
                out.append(float(total / count))
                offset += len(sample.input_ids)
    return out


@pytest.mark.parametrize("arch", list(WINDOWED))
@pytest.mark.parametrize("requested", ["varlen_sdpa", "sdpa", "eager"])
def test_each_packed_sample_has_its_unpacked_loss(arch, requested):
    chosen = choose_attention(requested, "cpu")
    attention = attention_for_model(chosen, _config(arch))  # gemma2: sdpa -> eager
    model = _model(arch, attention)
    samples = _samples()
    rows = [
        [samples[i] for i in unit]
        for unit in pack_first_fit_decreasing([len(s.input_ids) for s in samples], 64)
    ]
    assert any(len(row) > 1 for row in rows)
    assert sum(len(s.input_ids) > WINDOW for s in samples) >= 4  # the window matters
    # The mask kind of the kernel asked for, as the loop builds it; the wrapper adapts it to the one in use.
    batch = collate_packed(rows, pad_id=2, block_mask=packed_mask_kind(chosen))
    packed = _packed_losses(CausalLMWithLoss(model), rows, batch)
    expected = _alone_losses(arch, [s for row in rows for s in row], model.state_dict())
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(expected), **TOLERANCE)


@pytest.mark.parametrize(
    ("arch", "requested"), [("gemma2", "varlen_sdpa"), ("gemma2", "sdpa"), ("qwen2", "sdpa")]
)
def test_packed_gradients_match_samples_run_alone(arch, requested):
    """The soft-capped varlen path and the windowed masks also give the unpacked gradients."""
    chosen = choose_attention(requested, "cpu")
    model = _model(arch, attention_for_model(chosen, _config(arch))).train()
    samples = _samples(5, seed=1)
    rows = [
        [samples[i] for i in unit]
        for unit in pack_first_fit_decreasing([len(s.input_ids) for s in samples], 64)
    ]
    loss_sum, count = CausalLMWithLoss(model)(
        **collate_packed(rows, pad_id=2, block_mask=packed_mask_kind(chosen))
    )
    (loss_sum / count).backward()  # the mean over tokens, as the loop normalises
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}

    reference = _model(arch, "eager").train()
    reference.load_state_dict(model.state_dict())
    total = sum(
        reference(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss
        * (len(s.input_ids) - 1)
        for s in samples
    )
    assert int(count) == sum(len(s.input_ids) - 1 for s in samples)
    (total / count).backward()
    torch.testing.assert_close(loss_sum.detach(), total.detach(), rtol=1e-6, atol=0)
    for name, parameter in reference.named_parameters():  # measured: at most 6e-7 apart, gradients ~0.3
        torch.testing.assert_close(packed[name], parameter.grad, rtol=1e-4, atol=2e-6, msg=name)


def test_sdpa_falls_back_to_eager_only_where_logits_are_soft_capped():
    assert attention_for_model("sdpa", _config("gemma2")) == "eager"
    assert attention_for_model("sdpa", _config("mistral")) == "sdpa"
    assert attention_for_model(VARLEN, _config("gemma2")) == VARLEN


def test_varlen_kernel_refuses_missing_position_ids():
    q = torch.randn(1, 4, 10, 16)
    kv = torch.randn(1, 2, 10, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="position_ids"):
        varlen_sdpa_forward(module, q, kv, kv, None)


@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_batch_without_position_ids_is_refused_for_varlen(with_mask):
    model = _model("mistral", choose_attention("varlen_sdpa", "cpu"))
    rows = [_samples(3)]
    batch = collate_packed(rows, pad_id=2, block_mask="bool" if with_mask else "none")
    del batch["position_ids"]
    with pytest.raises(ValueError, match="position_ids"):
        CausalLMWithLoss(model)(**batch)
