"""Lean RMSNorm and SwiGLU give the plain modules' values and gradients while keeping less for backward."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, tiny_config
from tunesmith.models.lean_layers import apply_lean_layers, lean_rms_norm, silu_mul


def _plain_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_plain_formula(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 32).to(dtype)
    weight = (torch.rand(32) + 0.5).to(dtype)
    out_a, grads_a = _grads(lambda a, w: _plain_rms_norm(a, w, 1e-6), x, weight)
    out_b, grads_b = _grads(lambda a, w: lean_rms_norm(a, w, 1e-6), x, weight)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_b, out_a, **tol)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_plain_product(dtype):
    torch.manual_seed(1)
    gate, up = torch.randn(4, 9, 48).to(dtype), torch.randn(4, 9, 48).to(dtype)
    out_a, grads_a = _grads(lambda g, u: torch.nn.functional.silu(g) * u, gate, up)
    out_b, grads_b = _grads(silu_mul, gate, up)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_b, out_a, **tol)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, **tol)


def _saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_silu_mul_keeps_two_tensors_instead_of_three():
    gate = torch.randn(64, 256, requires_grad=True)
    up = torch.randn(64, 256, requires_grad=True)
    one = gate.numel() * 4
    assert _saved_bytes(lambda: torch.nn.functional.silu(gate) * up) == 3 * one
    assert _saved_bytes(lambda: silu_mul(gate, up)) == 2 * one


def test_rms_norm_keeps_no_normalised_copy_under_full_training():
    x = torch.randn(64, 256, requires_grad=True)
    weight = torch.ones(256, requires_grad=True)
    plain = _saved_bytes(lambda: _plain_rms_norm(x, weight, 1e-6))
    lean = _saved_bytes(lambda: lean_rms_norm(x, weight, 1e-6))
    assert lean < plain and lean <= x.numel() * 4 + 64 * 4 + 256 * 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_whole_model_loss_and_gradients_are_unchanged(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 300), dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before, grads_before = loss_and_grads()
    report = apply_lean_layers(model)
    after, grads_after = loss_and_grads()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_after[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    layers = model.config.num_hidden_layers
    if arch in ("llama", "qwen2", "mistral"):
        assert report.replaced == {"rms_norm": 2 * layers + 1, "swiglu": layers}
    if arch == "gemma":  # (1 + weight) norms and a GELU MLP: left as they are
        assert report.replaced == {}


def test_a_module_whose_forward_differs_keeps_its_own():
    class OddRMSNorm(torch.nn.Module):  # looks like an RMSNorm, computes something else
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * self.weight + 1

    model = torch.nn.Sequential(OddRMSNorm())
    report = apply_lean_layers(model)
    assert report.replaced == {} and "OddRMSNorm" in report.kept
    x = torch.randn(2, 16)
    torch.testing.assert_close(model(x), x + 1)


def test_a_run_with_lean_activations_trains_as_the_plain_one(tmp_path, tokenizer_dir):
    """Same losses (to rounding) over a few LoRA steps, with the lean forwards in place."""
    import json

    from conftest import make_tiny_model_dir
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import train

    model_dir = make_tiny_model_dir("llama", tmp_path / "model", tokenizer_dir)
    data = tmp_path / "d.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for lean in (False, True):
        cfg = load_config(
            {"model": str(model_dir), "data": {"train": [{"path": str(data)}], "seq_len": 64}},
            [
                f"train.lean_activations={str(lean).lower()}",
                "train.max_steps=4",
                "train.batch_size=2",
                "train.precision=fp32",
                f"output.dir={tmp_path / str(lean)}",
            ],
        )
        losses[lean] = train(cfg, show_progress=False).losses
    assert len(losses[True]) == 4
    for plain, lean in zip(losses[False], losses[True], strict=True):
        assert abs(plain - lean) < 1e-5
