"""Packed rows reach flash-attention with their sample boundaries, whatever the batch size.

transformers finds packed samples from position ids only in a one-row batch; with more rows it
runs plain causal attention per row. No GPU here, so flash-attention is replaced by a stand-in that
behaves as transformers' flash path does with and without `cu_seq_lens_*`: the packed loss equals
the samples run one by one only when the boundaries are passed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tunesmith.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing
from tunesmith.models.varlen_attention import flash_varlen_kwargs
from tunesmith.training.losses import CausalLMWithLoss
from unit.test_losses_and_packing import _samples


def test_cu_seq_lens_mark_every_sample_of_the_flattened_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    kwargs = flash_varlen_kwargs(position_ids)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]


def _flash_stand_in(seen: list[dict]):
    """query (B, H, L, D) -> (B, L, H, D), as transformers' flash path computes it."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("cu_seq_lens_q", "max_length_q")})
        batch, heads, length, dim = query.shape
        groups = heads // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        if kwargs.get("cu_seq_lens_q") is None:  # what flash does for a batch of several rows
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        flat = [t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value)]
        bounds = kwargs["cu_seq_lens_q"].tolist()
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (t[start:end].transpose(0, 1)[None] for t in flat)
            parts.append(
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)[0].transpose(0, 1)
            )
        return torch.cat(parts).reshape(batch, length, heads, dim), None

    return forward


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_batch_of_several_rows_matches_samples_one_by_one_under_flash(arch, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: list[dict] = []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", _flash_stand_in(seen))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, 300), dtype=torch.float32, attn_implementation="sdpa"
    )
    samples = _samples(6, seed=1)
    wrapped = CausalLMWithLoss(model, chunk_size=16)
    with torch.no_grad():
        total, count = torch.zeros(()), 0
        for sample in samples:
            loss_sum, n = wrapped(**collate_padded([sample], pad_id=2))
            total, count = total + loss_sum, count + int(n)
        model.config._attn_implementation = "flash_attention_2"
        rows = [
            [samples[i] for i in unit]
            for unit in pack_first_fit_decreasing([len(s.input_ids) for s in samples], 64)
        ]
        assert len(rows) > 1 and any(len(r) > 1 for r in rows)
        batch = collate_packed(rows, pad_id=2, block_mask="none")
        loss_sum, n = wrapped(**batch)
    assert seen and all(s["cu_seq_lens_q"] is not None for s in seen)
    assert (
        seen[0]["cu_seq_lens_q"].tolist()
        == flash_varlen_kwargs(batch["position_ids"])["cu_seq_lens_q"].tolist()
    )
    assert int(n) == count
    torch.testing.assert_close(loss_sum / n, total / count, rtol=1e-5, atol=1e-5)
