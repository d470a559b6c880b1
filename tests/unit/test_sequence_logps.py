"""Per-answer log-probs from one packed row equal those of each sequence run alone through the model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.models.varlen_attention import register_varlen_sdpa
from tunesmith.training.sequence_logps import SequenceScorer, sequence_ids


def _samples(vocab: int) -> list[TokenizedSample]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for prompt_len, answer_len in [(5, 7), (5, 3), (9, 12), (2, 1)]:
        ids = torch.randint(3, vocab, (prompt_len + answer_len,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        out.append(TokenizedSample(ids, labels, RowRef("mem", len(out) + 1)))
    return out


def _alone(model, sample: TokenizedSample) -> float:
    """The reference: full logits of the sequence alone, log-softmax, the answer tokens' entries summed."""
    ids = torch.tensor([sample.input_ids])
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(sample.labels[1:])
    keep = targets != IGNORE_INDEX
    return float(logps[keep].gather(1, targets[keep][:, None]).sum())


def test_sequence_ids_restart_with_the_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert sequence_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, 4, 4]]


@pytest.mark.parametrize("attention", ["sdpa", "eager", VARLEN])
def test_packed_answer_logps_equal_each_sequence_alone(attention, tiny_model_dirs):
    register_varlen_sdpa()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], attn_implementation=attention)
    samples = _samples(model.config.vocab_size)
    batch = collate_packed([samples], pad_id=2, block_mask=packed_mask_kind(attention))
    with torch.no_grad():
        sums, counts = SequenceScorer(model, chunk_size=8)(**batch)
        expected = [_alone(model, s) for s in samples]
    assert counts[: len(samples)].tolist() == [s.num_trained for s in samples]
    torch.testing.assert_close(sums[: len(samples)], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_chunked_head(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    samples = _samples(model.config.vocab_size)
    batch = collate_packed([samples], pad_id=2, block_mask="bool")
    sums, _ = SequenceScorer(model, chunk_size=4)(**batch)
    (sums[0] - sums[2]).backward()
    chunked = model.lm_head.weight.grad.clone()
    model.zero_grad()
    sums, _ = SequenceScorer(model, chunk_size=10_000)(**batch)
    (sums[0] - sums[2]).backward()
    torch.testing.assert_close(chunked, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    assert chunked.abs().sum() > 0
