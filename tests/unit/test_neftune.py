"""NEFTune: the noise of the paper's Algorithm 1 in training, none in eval, hooks removable, and a
tiny model still trains with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import IDENTITY_ROWS
from tunesmith.config.schema import RunConfig
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.training.neftune import attach_neftune, noise_scale

ALPHA = 5.0


@pytest.fixture
def model(tiny_model_dirs: dict[str, Path]) -> torch.nn.Module:
    return load_model(tiny_model_dirs["llama"], attention="eager")


def _embedded(model: torch.nn.Module, seed: int, **inputs: torch.Tensor) -> torch.Tensor:
    """What the first decoder layer receives: the (noisy) input embeddings."""
    seen: list[torch.Tensor] = []
    layer = model.model.layers[0]
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0].detach()), with_kwargs=True
    )
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_train_mode_noise_is_the_papers_formula(model: torch.nn.Module) -> None:
    ids = torch.randint(3, 100, (2, 12))
    clean = model.get_input_embeddings()(ids).detach()
    d = clean.shape[-1]
    with attach_neftune(model, ALPHA):
        model.train()
        noisy = _embedded(model, 7, input_ids=ids)
    torch.manual_seed(7)  # the paper's eps ~ U(-1, 1), drawn the same way
    expected = clean + torch.zeros_like(clean).uniform_(-1, 1) * (ALPHA / math.sqrt(12 * d))
    torch.testing.assert_close(noisy, expected)
    magnitude = (noisy - clean).abs()
    assert magnitude.max() <= ALPHA / math.sqrt(12 * d) * (1 + 1e-5)
    assert magnitude.mean() == pytest.approx(0.5 * ALPHA / math.sqrt(12 * d), rel=0.1)


def test_eval_mode_has_no_noise_and_remove_restores(model: torch.nn.Module) -> None:
    ids = torch.randint(3, 100, (2, 12))
    clean = model.get_input_embeddings()(ids).detach()
    handle = attach_neftune(model, ALPHA)
    model.eval()
    torch.testing.assert_close(_embedded(model, 0, input_ids=ids), clean, rtol=0, atol=0)
    model.train()
    assert not torch.equal(_embedded(model, 0, input_ids=ids), clean)
    handle.remove()
    torch.testing.assert_close(_embedded(model, 0, input_ids=ids), clean, rtol=0, atol=0)


def test_padded_rows_use_their_real_length_and_padding_gets_none(model: torch.nn.Module) -> None:
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    clean = model.get_input_embeddings()(ids).detach()
    d = clean.shape[-1]
    with attach_neftune(model, ALPHA):
        model.train()
        noise = _embedded(model, 3, input_ids=ids, attention_mask=mask) - clean
    assert noise[1, 6:].abs().max() == 0
    assert noise[0].abs().max() == pytest.approx(ALPHA / math.sqrt(10 * d), rel=0.05)
    assert noise[1, :6].abs().max() == pytest.approx(ALPHA / math.sqrt(6 * d), rel=0.05)


def test_packed_rows_scale_each_sample_by_its_own_length() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])  # samples of 3, 5 and 2 tokens
    scale = noise_scale((1, 10), 64, ALPHA, position_ids=position_ids)
    lengths = torch.tensor([3, 3, 3, 5, 5, 5, 5, 5, 2, 2], dtype=torch.float32)
    torch.testing.assert_close(scale[0], ALPHA / torch.sqrt(lengths * 64))


def test_packed_forward_gets_per_sample_noise(model: torch.nn.Module) -> None:
    ids = torch.randint(3, 100, (1, 8))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])
    clean = model.get_input_embeddings()(ids).detach()
    d = clean.shape[-1]
    with attach_neftune(model, ALPHA):
        model.train()
        noise = _embedded(model, 5, input_ids=ids, position_ids=position_ids) - clean
    expected = torch.zeros_like(clean)
    torch.manual_seed(5)
    eps = torch.zeros_like(clean).uniform_(-1, 1)
    expected[:, :6] = eps[:, :6] * ALPHA / math.sqrt(6 * d)
    expected[:, 6:] = eps[:, 6:] * ALPHA / math.sqrt(2 * d)
    torch.testing.assert_close(noise, expected)


def test_tiny_model_trains_with_neftune(tiny_model_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    model = load_model(tiny_model_dirs["llama"], attention="eager")
    texts = [f"{q} {a}" for q, a in IDENTITY_ROWS[:4]]
    ids = [tokenizer(t)["input_ids"][:16] for t in texts]
    width = min(len(i) for i in ids)
    batch = torch.tensor([i[:width] for i in ids])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    with attach_neftune(model, ALPHA):
        model.train()
        for _ in range(15):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_config_field_defaults_off_and_rejects_non_positive() -> None:
    data = {"train": [{"path": "x.jsonl"}]}
    assert RunConfig.model_validate({"data": data}).train.neftune_alpha is None
    assert RunConfig.model_validate({"data": data, "train": {"neftune_alpha": 5}}).train.neftune_alpha == 5
    with pytest.raises(ValueError, match="neftune_alpha"):
        RunConfig.model_validate({"data": data, "train": {"neftune_alpha": 0}})


def test_a_run_with_neftune_alpha_trains_on_noisy_embeddings_and_evaluates_clean(tiny_model_dirs, tmp_path):
    from conftest import base_config, write_chat_jsonl
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import train

    data = write_chat_jsonl(tmp_path / "chat.jsonl", [IDENTITY_ROWS[0]] * 8)

    def run(name: str, **train_settings: float) -> tuple[list[float], list[float]]:
        cfg = base_config(
            tiny_model_dirs["llama"],
            data,
            tmp_path / name,
            train={"epochs": 2, "eval_every": 100, **train_settings},
        )
        cfg["data"]["eval"] = [{"path": str(data)}]
        result = train(load_config(cfg), show_progress=False)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return result.losses, [r["eval_loss"] for r in rows if "eval_loss" in r]

    plain, noisy = run("plain"), run("noisy", neftune_alpha=1.0)
    assert noisy[0][0] != plain[0][0]  # the very first forward already sees the noise
    assert noisy[0][-1] < noisy[0][0] - 0.3, (noisy[0], plain[0])
    # Evaluation of the untrained model is clean: the same as without NEFTune before any update
    plain_start = run("plain-eval", max_steps=1, lr=1e-12)[1][0]
    noisy_start = run("noisy-eval", max_steps=1, lr=1e-12, neftune_alpha=1.0)[1][0]
    assert noisy_start == pytest.approx(plain_start, abs=1e-6)
