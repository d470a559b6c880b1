"""The fast loss equals the model's own loss; packed rows equal the same samples run one by one."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ARCHITECTURES, tiny_config
from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed, collate_padded, pack_first_fit_decreasing, packing_fill
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA
from tunesmith.models.varlen_attention import register_varlen_sdpa
from tunesmith.training.loop import enable_activation_checkpointing
from tunesmith.training.losses import CausalLMWithLoss


def _model(arch: str, vocab: int = 300, seed: int = 0, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    if attention == VARLEN_SDPA:
        register_varlen_sdpa()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab), dtype=torch.float32, attn_implementation=attention
    )


def _samples(count: int, vocab: int = 300, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = rng.randint(5, 40)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randint(1, n - 2)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(TokenizedSample(ids, labels, RowRef("mem", i + 1)))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_equals_model_loss(arch, chunk):
    model = _model(arch)
    batch = collate_padded(_samples(4), pad_id=2)
    reference = model(**batch).loss  # transformers' own mean CE over labelled next tokens
    loss_sum, count = CausalLMWithLoss(model, chunk_size=chunk)(**batch)
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attention", ["sdpa", "eager", VARLEN_SDPA])
def test_packed_batch_matches_samples_run_one_by_one(arch, attention):
    """sdpa/eager isolate packed samples with a block mask; the varlen kernel with position ids alone."""
    model = _model(arch, attention=attention)
    wrapped = CausalLMWithLoss(model, chunk_size=16)
    samples = _samples(6, seed=1)

    total, count = torch.zeros(()), 0
    for sample in samples:
        loss_sum, n = wrapped(**collate_padded([sample], pad_id=2))
        total, count = total + loss_sum, count + int(n)
    (total / count).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    rows = [
        [samples[i] for i in unit]
        for unit in pack_first_fit_decreasing([len(s.input_ids) for s in samples], 64)
    ]
    assert (
        any(len(r) > 1 for r in rows) and len({sum(len(s.input_ids) for s in r) for r in rows}) > 1
    )  # padded tails
    loss_sum, n = wrapped(**collate_packed(rows, pad_id=2, block_mask=packed_mask_kind(attention)))
    assert int(n) == count
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, total / count, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # the first flex call compiles its kernel: about 25 s on 2 CPU cores
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flex_attention_packed_forward_matches_samples_run_one_by_one(arch):
    """Flex finds sample boundaries from position ids alone. Its backward pass runs only on GPUs, so on
    CPU this checks the forward (the masks it builds); training with it on CPU is refused."""
    model = _model(arch, attention="flex_attention")
    wrapped = CausalLMWithLoss(model, chunk_size=16)
    samples = _samples(6, seed=1)
    with torch.no_grad():
        total, count = torch.zeros(()), 0
        for sample in samples:
            loss_sum, n = wrapped(**collate_padded([sample], pad_id=2))
            total, count = total + loss_sum, count + int(n)
        rows = [
            [samples[i] for i in unit]
            for unit in pack_first_fit_decreasing([len(s.input_ids) for s in samples], 64)
        ]
        assert packed_mask_kind("flex_attention") == "none"
        loss_sum, n = wrapped(**collate_packed(rows, pad_id=2, block_mask="none"))
    assert int(n) == count
    torch.testing.assert_close(loss_sum / n, total / count, rtol=1e-5, atol=1e-5)


def test_first_fit_decreasing_fills_rows_and_keeps_every_sample():
    rng = random.Random(0)
    lengths = [min(1024, int(rng.lognormvariate(5.3, 0.7)) + 8) for _ in range(2000)]
    bins = pack_first_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert packing_fill(lengths, bins, 1024) > 0.95


def test_packed_labels_never_cross_a_sample_boundary():
    a = TokenizedSample([5, 6, 7], [5, 6, 7], RowRef("m", 1))
    b = TokenizedSample([8, 9], [8, 9], RowRef("m", 2))
    batch = collate_packed([[a, b]], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    mask = batch["attention_mask"][0, 0]
    assert not mask[3, :3].any() and mask[4, 3] and not mask[1, 2]


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(adapter):
    from peft import LoraConfig, get_peft_model

    def loss_and_grads(checkpointing: bool):
        model = _model("llama", seed=3)
        if adapter == "lora":
            model = get_peft_model(
                model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
            )
        if checkpointing:
            enable_activation_checkpointing(model)
            if adapter == "lora":
                model.enable_input_require_grads()
        model.train()
        loss_sum, count = CausalLMWithLoss(model, chunk_size=8)(
            **collate_padded(_samples(3, seed=4), pad_id=2)
        )
        (loss_sum / count).backward()
        return loss_sum / count, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(False)
    ckpt_loss, ckpt = loss_and_grads(True)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
