"""The `optim:` choices: each trains, each update matches its reference, each resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import ConfigError, load_config
from tunesmith.training import loop
from tunesmith.training.optim import build_optimizer, decay_groups, make_optimizer, make_scheduler

ROWS = [(f"Question number {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]
FULL = {"type": "full"}
LORA = {"type": "lora", "r": 4}

# name -> (adapter, lr, extra optim keys): small ranks and short switch intervals, so the tiny model
# exercises projections, their refresh and block switches within a few steps.
CASES = {
    "adamw": (LORA, 1e-2, {}),
    "adamw_8bit": (FULL, 2e-3, {}),
    "paged_adamw_8bit": (FULL, 2e-3, {}),
    "adafactor": (FULL, 3e-2, {}),
    "lion": (FULL, 1e-3, {}),
    "muon": (FULL, 5e-3, {}),
    "galore": (FULL, 5e-3, {"galore": {"rank": 8, "update_proj_gap": 3, "scale": 1.0}}),
    "apollo": (FULL, 5e-3, {"apollo": {"rank": 8, "update_proj_gap": 3}}),
    "adam_mini": (FULL, 2e-3, {}),
    "badam": (FULL, 5e-3, {"badam": {"switch_every": 2, "switch_mode": "random"}}),
}


def _config(model_dir, data, out, name, **train):
    adapter, lr, extra = CASES[name]
    settings = {"epochs": 2, "batch_size": 2, "grad_accum": 2, "lr": lr, "warmup_ratio": 0.0, "seed": 3}
    settings.update(train)
    return load_config(
        base_config(model_dir, data, out, adapter=adapter, train=settings, optim={"name": name, **extra})
    )


def _train(cfg, **kwargs):
    return loop.train(cfg, show_progress=False, **kwargs)


# -- every optimizer trains, and resumes bit-identically ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_trains_and_resumes_bit_identically(name, tiny_model_dirs, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir = tiny_model_dirs["llama"]
    straight = _train(_config(model_dir, data, tmp_path / "a", name))
    assert straight.steps == 6  # 2 epochs x (2 + 2 + 1 micro-batches)
    losses = straight.losses
    assert all(math.isfinite(x) for x in losses)
    # the same rows again: epoch 2 (steps 4-6) well below epoch 1 (steps 1-3), and still falling
    assert sum(losses[3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    assert losses[-1] < losses[3] < losses[0], losses

    first = _train(_config(model_dir, data, tmp_path / "b", name), stop_after_step=3)
    assert first.interrupted and first.steps == 3  # mid-block for badam (switch every 2)
    second = _train(_config(model_dir, data, tmp_path / "b", name, resume="auto"))
    assert first.losses + second.losses == losses  # exactly the same floats: state restored in full
    for (key, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), key


def test_default_is_the_historic_adamw(tiny_model_dirs, chat_file, tmp_path):
    cfg = load_config(
        base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "r", train={"weight_decay": 0.1})
    )
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    made = make_optimizer(model, cfg)
    historic = build_optimizer(model.parameters(), cfg.train.lr, cfg.train.weight_decay)
    assert type(made) is torch.optim.AdamW and made.defaults == historic.defaults
    assert made.defaults["fused"] is True and made.defaults["betas"] == (0.9, 0.999)
    assert made.defaults["eps"] == 1e-8
    assert made.state_dict()["param_groups"] == historic.state_dict()["param_groups"]
    assert [g["weight_decay"] for g in made.param_groups] == [0.1, 0.0]


# -- update rules against the package or the paper ---------------------------------------------------


def _steps(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def _problem(seed=0, shapes=((24, 16), (12, 40), (16,)), steps=7):
    torch.manual_seed(seed)
    weights = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(steps)]
    return weights, grads


@pytest.mark.parametrize("name", ["galore", "apollo", "apollo_mini"])
def test_lowrank_matches_the_upstream_package(name):
    """Same gradients, same updates as galore-torch / apollo-torch (whose state cannot be resumed)."""
    from tunesmith.training.optimizers import Apollo, GaLoreAdamW

    weights, grads = _problem()
    extra = {"rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    if name == "galore":
        ref_cls = pytest.importorskip("galore_torch").GaLoreAdamW
        ours_cls, ours_extra = GaLoreAdamW, extra
    else:
        ref_cls = pytest.importorskip("apollo_torch").APOLLOAdamW
        scale_type = "tensor" if name == "apollo_mini" else "channel"
        extra = {
            **extra,
            "rank": 1 if name == "apollo_mini" else 4,
            "scale_type": scale_type,
            "proj": "random",
        }
        ours_cls, ours_extra = Apollo, {**extra, "norm_growth_limit": True}

    def run(cls, group_extra):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = cls(
            [{"params": params[:2], **group_extra}, {"params": params[2:]}],
            lr=1e-2,
            eps=1e-6,
            weight_decay=0.1,
        )
        _steps(optimizer, params, grads)
        return params

    for ours, ref in zip(run(ours_cls, ours_extra), run(ref_cls, extra), strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_galore_step_is_the_papers_update():
    """One step by hand: P = U[:, :r] of the gradient's SVD (rows fewer than columns), Adam on P^T G."""
    from tunesmith.training.optimizers import GaLoreAdamW

    torch.manual_seed(1)
    w, g = torch.randn(6, 10), torch.randn(6, 10)
    p = torch.nn.Parameter(w.clone())
    opt = GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 5, "scale": 0.5}], lr=0.1, eps=1e-8)
    p.grad = g.clone()
    opt.step()
    u = torch.linalg.svd(g, full_matrices=False)[0][:, :2]
    r = u.T @ g
    m, v = 0.1 * r, 0.001 * r * r  # (1 - beta) x first gradient
    n = (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)  # bias-corrected
    torch.testing.assert_close(p.detach(), w - 0.1 * 0.5 * (u @ n), rtol=0, atol=1e-6)


def test_adamw_8bit_tracks_adamw():
    """bitsandbytes' 8-bit states: the same trajectory as torch's AdamW up to quantisation error."""
    import bitsandbytes as bnb

    weights, grads = _problem(shapes=((128, 128),), steps=5)
    runs = []
    for cls in (torch.optim.AdamW, bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        _steps(cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), params, grads)
        runs.append(params[0].detach() - weights[0])
    reference = runs[0]
    for moved in runs[1:]:
        assert not torch.equal(moved, reference)  # quantised, so not bit-equal ...
        assert (moved - reference).norm() < 0.02 * reference.norm()  # ... but the same updates


def test_lion_is_the_papers_update():
    """Lion (Chen et al., 2023): c = b1 m + (1 - b1) g; w -= lr (sign(c) + wd w); m = b2 m + (1 - b2) g."""
    import bitsandbytes as bnb

    weights, grads = _problem(shapes=((40, 30),), steps=4)
    params = [torch.nn.Parameter(weights[0].clone())]
    _steps(bnb.optim.Lion(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), params, grads)
    w, m = weights[0].clone(), torch.zeros_like(weights[0])
    for (g,) in grads:
        c = 0.9 * m + 0.1 * g
        w = w * (1 - 1e-3 * 0.1) - 1e-3 * torch.sign(c)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(params[0].detach(), w, rtol=0, atol=1e-6)


def _newton_schulz(x, steps=5):
    a, b, c = 3.4445, -4.775, 2.0315
    x = x / (x.norm() + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def test_muon_orthogonalises_hidden_matrices_and_adamw_takes_the_rest(tiny_model_dirs, chat_file, tmp_path):
    """Hidden 2-D weights: Muon's Nesterov momentum through Newton-Schulz, scaled to AdamW's RMS
    (0.2 sqrt(max(A, B))); embeddings, head and norms: torch's AdamW with the same lr."""
    cfg = load_config(
        base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "r", adapter=FULL, optim={"name": "muon"})
    )
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(10, 8), "hidden": torch.nn.Linear(8, 6, bias=False)}
    )
    model["norm"] = torch.nn.LayerNorm(8)
    optimizer = make_optimizer(model, cfg)
    lr = cfg.train.lr
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.step()
    momentum = 0.05 * grads["hidden.weight"]  # b = 0.95 b + (1 - 0.95) g from zero
    nesterov = grads["hidden.weight"] + 0.95 * (momentum - grads["hidden.weight"])  # g.lerp(b, 0.95)
    expected = before["hidden.weight"] - lr * 0.2 * math.sqrt(8) * _newton_schulz(nesterov)
    moved = model["hidden"].weight.detach() - before["hidden.weight"]
    assert moved.abs().max() > 1e-3
    # torch runs Newton-Schulz in bf16: its result differs from fp32's by a fraction of a percent
    torch.testing.assert_close(model["hidden"].weight.detach(), expected, rtol=0, atol=1e-4)
    for name in ("embed.weight", "norm.weight", "norm.bias"):  # first AdamW step: -lr * sign(g)
        moved = model.get_parameter(name).detach() - before[name]
        torch.testing.assert_close(moved, -lr * torch.sign(grads[name]), rtol=0, atol=1e-6)


def test_badam_updates_one_block_at_a_time_and_resets_its_state():
    from tunesmith.training.optimizers import BAdam

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    blocks = [list(layer.parameters()) for layer in layers]
    opt = BAdam(
        [{"params": [p for b in blocks for p in b]}],
        blocks=blocks,
        switch_every=2,
        switch_mode="ascending",
        lr=0.1,
    )
    reference = torch.optim.AdamW(blocks[0], lr=0.1)  # block 0 alone, as BAdam's first two steps
    shadow = [p.detach().clone().requires_grad_() for p in blocks[0]]
    shadow_opt = torch.optim.AdamW(shadow, lr=0.1)
    x = torch.randn(5, 4)
    for step in range(4):
        before = [[p.detach().clone() for p in b] for b in blocks]
        opt.zero_grad()
        out = x
        for layer in layers:
            out = layer(out)
        out.square().sum().backward()
        active = 0 if step < 2 else 1
        assert all((p.grad is None) == (i != active) for i, b in enumerate(blocks) for p in b)
        if step < 2:
            for s, p in zip(shadow, blocks[0], strict=True):
                s.grad = p.grad.clone()
            shadow_opt.step()
        opt.step()
        for i, b in enumerate(blocks):
            changed = any(not torch.equal(p, q) for p, q in zip(b, before[i], strict=True))
            assert changed == (i == active), (step, i)
        if step < 2:
            for s, p in zip(shadow, blocks[0], strict=True):
                torch.testing.assert_close(p.detach(), s.detach(), rtol=0, atol=1e-7)
        if step == 1:
            assert all(p not in opt.state for p in blocks[0])  # the block's Adam state is dropped
    del reference
    assert opt.state_dict()["badam"] == {"round": 0, "position": 2, "steps_in_block": 0, "blocks": 3}


def test_badam_random_order_is_a_seeded_permutation_per_round():
    from tunesmith.training.optimizers import BAdam

    layers = [torch.nn.Linear(2, 2) for _ in range(5)]
    blocks = [list(layer.parameters()) for layer in layers]
    opt = BAdam([p for b in blocks for p in b], blocks=blocks, switch_mode="random", seed=7)
    again = BAdam([p for b in blocks for p in b], blocks=blocks, switch_mode="random", seed=7)
    assert sorted(opt.order(0)) == list(range(5)) and opt.order(0) == again.order(0)
    assert [opt.order(r) for r in range(4)] != [opt.order(0)] * 4


def test_lora_plus_groups_match_peft(tiny_model_dirs, chat_file, tmp_path):
    """LoRA+ (Hayou et al., 2024): B matrices at lr * lr_ratio, the parameters peft's helper picks."""
    from peft.optimizers import create_loraplus_optimizer

    from tunesmith.models.adapters import apply_adapter
    from tunesmith.models.load import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(str(tiny_model_dirs["llama"]))
    model = apply_adapter(
        model, load_config(base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "r")).adapter
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = decay_groups(named, 0.0, lr_ratio=16.0)
    ours = {id(p): 1e-3 * g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    peft_opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    theirs = {id(p): g["lr"] for g in peft_opt.param_groups for p in g["params"]}
    assert ours == theirs
    assert {ours[id(p)] for n, p in named if "lora_B" in n} == {16e-3}


def test_lora_plus_lr_through_the_schedule_and_a_resumed_lr():
    """The B groups' lr is the schedule's lr x lr_ratio, also after a resume changes train.lr."""
    from tunesmith.config.schema import TrainConfig

    a, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.AdamW(decay_groups([("x.lora_A.w", a), ("x.lora_B.w", b)], 0.0, lr_ratio=4.0), lr=1e-3)
    sched = make_scheduler(opt, TrainConfig(lr=1e-3, warmup_ratio=0.0, scheduler="linear"), total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 4e-3])
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3])
    multipliers = [f(sched.last_epoch) for f in sched.lr_lambdas]  # what a resume multiplies a new lr by
    assert multipliers == pytest.approx([0.5, 2.0])


def test_full_only_optimizers_refuse_lora(tiny_model_dirs, chat_file, tmp_path):
    model = torch.nn.Linear(2, 2)
    for name in ("badam", "adam_mini"):
        cfg = load_config(
            base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "r", optim={"name": name})
        )
        with pytest.raises(ConfigError, match="adapter.type: full"):
            make_optimizer(model, cfg)


def test_options_for_another_optimizer_are_refused(tiny_model_dirs, chat_file, tmp_path):
    raw = base_config(tiny_model_dirs["llama"], chat_file, tmp_path / "r", optim={"galore": {"rank": 8}})
    with pytest.raises(ConfigError, match="optim.galore.*optim.name is 'adamw'"):
        load_config(raw)


def test_chain_state_round_trips():
    from tunesmith.training.optimizers import OptimizerChain

    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    chain = OptimizerChain([torch.optim.Muon([a], lr=0.01), torch.optim.AdamW([b], lr=0.01)])
    for _ in range(2):
        a.grad, b.grad = torch.randn(4, 4), torch.randn(4)
        chain.step()
    saved = chain.state_dict()
    fresh = OptimizerChain([torch.optim.Muon([a], lr=0.01), torch.optim.AdamW([b], lr=0.01)])
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state[a]["momentum_buffer"], chain.state[a]["momentum_buffer"])
    assert torch.equal(fresh.state[b]["exp_avg_sq"], chain.state[b]["exp_avg_sq"])
    assert len(fresh.param_groups) == 2


class _Toy(torch.nn.Module):
    """Embedding, 4 decoder-like layers of MLP matrices, a norm: names as in transformers models."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
        self.embed_tokens = torch.nn.Embedding(512, 64)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"up_proj": torch.nn.Linear(64, 256), "down_proj": torch.nn.Linear(256, 64)})
            for _ in range(4)
        )
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + layer["down_proj"](torch.relu(layer["up_proj"](x)))
        return self.norm(x).square().mean()


def test_lean_optimizers_hold_less_state_than_adamw(chat_file, tmp_path):
    """Optimizer state after one step, as the checkpoint counts it: each lean choice below AdamW's."""
    from tunesmith.training.checkpoint import _optimizer_bytes

    ids = torch.randint(0, 512, (2, 8))
    sizes = {}
    options = {"galore": {"galore": {"rank": 8}}, "apollo": {"apollo": {"rank": 8}}}
    for name in ("adamw", "adamw_8bit", "adafactor", "lion", "galore", "apollo", "adam_mini", "badam"):
        torch.manual_seed(0)
        model = _Toy()
        optim = {"name": name, **options.get(name, {})}
        cfg = load_config(base_config(tmp_path / "model", chat_file, tmp_path, adapter=FULL, optim=optim))
        optimizer = make_optimizer(model, cfg)
        model(ids).backward()
        optimizer.step()
        sizes[name] = _optimizer_bytes(optimizer)
    adamw = sizes.pop("adamw")
    weights = sum(p.numel() * 4 for p in _Toy().parameters())
    assert adamw >= 2 * weights  # two fp32 moments per weight
    limits = {
        "adamw_8bit": 0.3,
        "adafactor": 0.1,
        "lion": 0.55,
        "galore": 0.55,
        "apollo": 0.55,
        "adam_mini": 0.6,
    }
    limits["badam"] = 0.45  # one of four layers (embeddings are not in a block)
    for name, size in sizes.items():
        assert size < limits[name] * adamw, (name, size, adamw)
