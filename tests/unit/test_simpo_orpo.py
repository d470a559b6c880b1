"""SimPO and ORPO on the one loop: TRL parity (loss and every gradient), learning, accumulation, resume.

Parity: tunesmith's `compute_loss` on its packed padding-free batch against TRL 1.x's own trainers
(`CPOTrainer(loss_type="simpo")`, `ORPOTrainer`) on TRL's concatenated, right-padded batch of the
same token ids, the same weights, in fp32. ORPO's NLL is a per-pair token mean over the chosen
answer (TRL: one token mean over the micro-batch's chosen sequences, prompt included), so its
odds-ratio part is checked against TRL and its NLL against an independent cross-entropy; with
one-token prompts and equally long chosen answers the two NLLs coincide, and the whole loss is
checked against TRL's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.data.conversation import RowRef
from tunesmith.data.preference import TokenizedPair
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.training.loop import train

METHODS = ["simpo", "orpo"]
PAIRS = [
    (f"Question {i}: is the sky blue?", f"Yes, it is blue {i}.", f"No idea, maybe green {i}.")
    for i in range(12)
]
REVERSED = [(prompt, rejected, chosen) for prompt, chosen, rejected in PAIRS]
"""The tiny random models happen to prefer PAIRS' chosen answers; these start out all wrong."""
VARIED = [  # answers of different lengths: token-mean and pair-mean normalisations differ on these
    (f"Q{i}: name a colour.", "Blue" + " and green" * (i % 3), "Maybe" + " I do not know" * (i % 4 + 1))
    for i in range(8)
]
PARITY = 1e-5
"""fp32 tolerance for losses and gradients against TRL (padded eager attention vs packed varlen)."""


def _pairs_file(path: Path, rows: list[tuple[str, str, str]] = PAIRS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, chosen, rejected in rows:
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def _cfg(
    method: str, model_dir: Path, data: Path, out: Path, adapter: str = "lora", settings=None, **train
) -> dict:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "full"} if adapter == "full" else {"type": "lora", "r": 8, "alpha": 16},
        train={"batch_size": 4, "lr": 5e-3 if adapter == "lora" else 1e-3, **train},
    )
    cfg["method"] = method
    cfg["data"]["eval_split"] = 0.0
    if settings:
        cfg[method] = settings
    return cfg


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


# ------------------------------------------------------------------------------ TRL parity


class _Ours:
    """The method as the loop builds it, full fine-tuning in fp32, for one packed batch of pairs."""

    def __init__(self, method: str, model_dir: Path, data: Path, out: Path, settings: dict) -> None:
        from tunesmith.models.adapters import apply_adapter
        from tunesmith.models.attention import choose_attention
        from tunesmith.models.load import load_model_and_tokenizer
        from tunesmith.training.methods import get_method

        cfg = load_config(_cfg(method, model_dir, data, out, adapter="full", settings=settings))
        self.attention = choose_attention(cfg.train.attention, "cpu")
        model, self.tokenizer, _ = load_model_and_tokenizer(cfg.model, attention=self.attention)
        self.model = apply_adapter(model, cfg.adapter)
        self.method = get_method(method)
        self.prepared = self.method.prepare_data(cfg, self.tokenizer)
        self.method.batches(self.prepared, cfg, self.tokenizer.pad_token_id, self.attention)
        self.wrapped = self.method.wrap_model(self.model, cfg)

    def loss_and_grads(
        self, pairs: list[TokenizedPair]
    ) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        from tunesmith.models.attention import packed_mask_kind
        from tunesmith.training.methods.pairs import collate_pairs

        batch = collate_pairs(pairs, self.tokenizer.pad_token_id, packed_mask_kind(self.attention))
        self.model.zero_grad(set_to_none=True)
        out = self.method.compute_loss(self.wrapped, batch.tensors)
        assert int(out.count) == len(pairs) == batch.units
        loss = out.loss_sum / out.count  # what the loop trains on for a one-micro-batch step
        loss.backward()
        metrics = {name: float(value) / len(pairs) for name, value in out.metrics.items()}
        return loss.detach(), metrics, _grads(self.model)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


def _trl_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    return model.train()


def _trl_trainer(kind: str, model: Any, tokenizer: Any, out: Path, **settings: Any) -> Any:
    """TRL's own trainer; its dataset is a placeholder, batches are built from our token ids."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = dict(output_dir=str(out), report_to="none", use_cpu=True, max_length=512)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    if kind == "simpo":
        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, **common, **settings)
        trainer = CPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    else:
        args = ORPOConfig(**common, **settings)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    assert trainer.model is model
    return trainer


def _padded(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's batch layout: prompt + answer per row, right-padded, labels -100 on prompt and padding."""
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        rows = [(p.prompt_ids, getattr(p, f"{side}_ids")) for p in pairs]
        width = max(len(prompt) + len(answer) for prompt, answer in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            ids[r, :n] = torch.tensor([*prompt, *answer])
            labels[r, len(prompt) : n] = torch.tensor(answer)
            mask[r, :n] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=PARITY, msg=name)
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo_simpo_loss_and_gradients(label_smoothing, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    settings = {"beta": 2.0, "gamma": 1.0, "label_smoothing": label_smoothing}
    ours = _Ours("simpo", model_dir, _pairs_file(tmp_path / "p.jsonl", VARIED), tmp_path / "run", settings)
    pairs = list(ours.prepared.data.train[:4])
    loss, metrics, grads = ours.loss_and_grads(pairs)

    model = _trl_model(model_dir)
    trainer = _trl_trainer(
        "simpo",
        model,
        ours.tokenizer,
        tmp_path / "trl",
        beta=2.0,
        simpo_gamma=1.0,
        label_smoothing=label_smoothing,
    )
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, _padded(pairs, ours.tokenizer.pad_token_id))
    trl_loss.backward()

    assert float(loss) == pytest.approx(trl_loss.item(), abs=PARITY)
    _assert_same_grads(grads, _grads(model))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=PARITY), name
    for name in ("logps/chosen", "logps/rejected"):  # TRL's SimPO logs per-token means, as we do
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=PARITY), name


def _answer_nll(model: Any, pairs: list[TokenizedPair]) -> torch.Tensor:
    """Independent NLL: each prompt + chosen answer alone, cross-entropy averaged over the answer's
    tokens, then over pairs."""
    per_pair = []
    for pair in pairs:
        ids = torch.tensor([[*pair.prompt_ids, *pair.chosen_ids]])
        logits = model(input_ids=ids).logits[0, :-1]
        start = len(pair.prompt_ids) - 1  # the logit that predicts the answer's first token
        per_pair.append(F.cross_entropy(logits[start:].float(), ids[0, start + 1 :]))
    return torch.stack(per_pair).mean()


def test_orpo_odds_ratio_matches_trl_and_nll_matches_cross_entropy(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["qwen2"]
    ours = _Ours(
        "orpo", model_dir, _pairs_file(tmp_path / "p.jsonl", VARIED), tmp_path / "run", {"beta": 0.5}
    )
    pairs = list(ours.prepared.data.train[:4])
    assert len({len(p.chosen_ids) for p in pairs}) > 1  # lengths differ: the NLL normalisation matters
    loss, metrics, grads = ours.loss_and_grads(pairs)

    model = _trl_model(model_dir)
    trainer = _trl_trainer("orpo", model, ours.tokenizer, tmp_path / "trl", beta=0.5)
    batch = _padded(pairs, ours.tokenizer.pad_token_id)
    chosen_logps, rejected_logps, *_ = trainer.concatenated_forward(model, batch)
    odds, _, _, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
    odds_term = -odds.mean()  # TRL's loss is nll - mean(beta * log s(log odds))
    nll = _answer_nll(model, pairs)
    (odds_term + nll).backward()

    assert float(loss) == pytest.approx((odds_term + nll).item(), abs=PARITY)
    assert metrics["nll"] == pytest.approx(nll.item(), abs=PARITY)
    assert metrics["log_odds_ratio"] == pytest.approx(log_odds_ratio.item(), abs=PARITY)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds_chosen.item(), abs=PARITY)
    assert metrics["logps/chosen"] == pytest.approx(chosen_logps.mean().item(), abs=PARITY)
    assert metrics["logps/rejected"] == pytest.approx(rejected_logps.mean().item(), abs=PARITY)
    assert metrics["rewards/margins"] == pytest.approx(
        0.5 * (chosen_logps - rejected_logps).mean().item(), abs=PARITY
    )
    _assert_same_grads(grads, _grads(model))


def test_orpo_whole_loss_matches_trl_where_the_nll_normalisations_agree(tiny_model_dirs, tmp_path):
    """One-token prompts (nothing of the prompt is predicted) and chosen answers of one length: TRL's
    token mean over prompt + answer is then our per-pair answer mean, so the whole loss must match."""
    model_dir = tiny_model_dirs["llama"]
    ours = _Ours("orpo", model_dir, _pairs_file(tmp_path / "p.jsonl"), tmp_path / "run", {"beta": 0.1})
    generator = torch.Generator().manual_seed(0)
    vocab = ours.model.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    bos = ours.model.config.bos_token_id
    pairs = [TokenizedPair([bos], ids(6), ids(3 + 2 * i), RowRef("mem", i + 1)) for i in range(4)]
    loss, metrics, grads = ours.loss_and_grads(pairs)

    model = _trl_model(model_dir)
    trainer = _trl_trainer("orpo", model, ours.tokenizer, tmp_path / "trl", beta=0.1)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, _padded(pairs, ours.tokenizer.pad_token_id))
    trl_loss.backward()

    assert float(loss) == pytest.approx(trl_loss.item(), abs=PARITY)
    for name in ("nll", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies", "rewards/margins"):
        assert metrics[name] == pytest.approx(trl_metrics["nll_loss" if name == "nll" else name], abs=PARITY)
    _assert_same_grads(grads, _grads(model))


@pytest.mark.parametrize("method", METHODS)
def test_no_reference_pass(method, tiny_model_dirs, tmp_path):
    """Reference-free: one decoder forward per micro-batch, no second model anywhere."""
    ours = _Ours(method, tiny_model_dirs["llama"], _pairs_file(tmp_path / "p.jsonl"), tmp_path / "run", {})
    calls = []
    handle = ours.model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        ours.loss_and_grads(list(ours.prepared.data.train[:4]))
    finally:
        handle.remove()
    assert len(calls) == 1
    wrapped_params = sum(p.numel() for p in ours.wrapped.parameters())
    assert wrapped_params == sum(p.numel() for p in ours.model.parameters())


# ------------------------------------------------------------------------------ on the loop


@pytest.mark.parametrize("method", METHODS)
def test_separable_pairs_are_learned(method, tiny_model_dirs, tmp_path):
    """The answers the random model prefers are the rejected ones: accuracy starts at 0 and must flip."""
    run = tmp_path / "run"
    data = _pairs_file(tmp_path / "p.jsonl", REVERSED)
    cfg = _cfg(method, tiny_model_dirs["qwen2"], data, run, epochs=4, scheduler="constant")
    train(load_config(cfg), show_progress=False)
    rows = _rows(run)
    assert len(rows) == 12
    assert rows[0]["rewards/accuracies"] < 0.5 and rows[0]["rewards/margins"] < 0
    assert min(r["rewards/accuracies"] for r in rows[-3:]) > 0.9, [r["rewards/accuracies"] for r in rows]
    assert rows[-1]["rewards/margins"] > 0
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    expected |= {"logps/chosen", "logps/rejected"}
    if method == "simpo":
        assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    else:  # the NLL (about ln(vocab) for a random model) dominates ORPO's loss; both parts must fall
        expected |= {"log_odds_ratio", "log_odds_chosen", "nll"}
        assert rows[-1]["nll"] < rows[0]["nll"] - 0.5
        assert rows[-1]["log_odds_ratio"] > rows[0]["log_odds_ratio"] + 0.2
        assert rows[-1]["loss"] < rows[0]["loss"]
    assert expected <= rows[-1].keys()
    # rewards are beta times the per-token mean log-probs that are logged next to them
    beta = getattr(load_config(cfg), method).beta
    assert rows[-1]["rewards/chosen"] == pytest.approx(beta * rows[-1]["logps/chosen"], rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_the_bigger_batch(method, tiny_model_dirs, tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl", VARIED + VARIED[:4])
    model_dir = tiny_model_dirs["mistral"]
    big = train(load_config(_cfg(method, model_dir, data, tmp_path / "a", batch_size=4)), show_progress=False)
    acc = train(
        load_config(_cfg(method, model_dir, data, tmp_path / "b", batch_size=2, grad_accum=2)),
        show_progress=False,
    )
    assert big.steps == acc.steps == 3
    assert big.losses == pytest.approx(acc.losses, abs=1e-6)
    assert big.losses[0] != pytest.approx(big.losses[-1], abs=1e-4)  # the steps trained something


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(method, tiny_model_dirs, tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl")
    model_dir = tiny_model_dirs["llama"]
    straight = train(
        load_config(_cfg(method, model_dir, data, tmp_path / "a", epochs=2)), show_progress=False
    )
    first = train(
        load_config(_cfg(method, model_dir, data, tmp_path / "b", epochs=2)),
        show_progress=False,
        stop_after_step=2,
    )
    resumed = _cfg(method, model_dir, data, tmp_path / "b", epochs=2, resume="auto")
    second = train(load_config(resumed), show_progress=False)
    assert len(straight.losses) == 6
    assert first.losses + second.losses == straight.losses


@pytest.mark.parametrize("method", METHODS)
def test_example_config_and_pairs_load(method, tokenizer, monkeypatch):
    """examples/<method>.yaml is valid and every example pair tokenizes (none skipped or dropped)."""
    from tunesmith.data.preference import build_preference_data

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example's paths are repo-relative
    cfg = load_config(f"examples/{method}.yaml")
    assert cfg.method == method
    built = build_preference_data(cfg.data, tokenizer, method)
    assert len(built.train) + len(built.eval) == 16
    assert not built.report.skipped and not built.report.dropped
    assert all(pair.chosen_ids and pair.rejected_ids for pair in [*built.train, *built.eval])
