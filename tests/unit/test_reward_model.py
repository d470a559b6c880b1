"""Reward model (method: reward): TRL parity, pairs learned, exact accumulation and resume, scoring.

The parity test builds the same tiny model twice: tunesmith's `RewardScorer` on a packed
padding-free row, and transformers' `LlamaForSequenceClassification` (the base weights and our head
copied into its `score` layer) on TRL's right-padded pairs, scored by TRL 1.x's
`RewardTrainer.compute_loss` called unbound with a stand-in `self`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.loop import train

PAIRS = [
    (f"Question {i}: is the sky blue?", f"Yes, it is blue {i}.", f"No idea, maybe green {i}.")
    for i in range(12)
]
TOL = 1e-5


def _pairs_file(path: Path, margins: list[float] | None = None, n: int = len(PAIRS)) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, (prompt, chosen, rejected) in enumerate(PAIRS[:n]):
            row: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if margins is not None:
                row["margin"] = margins[i]
            handle.write(json.dumps(row) + "\n")
    return path


def _cfg(
    model_dir: Path,
    data: Path,
    out: Path,
    adapter: str = "lora",
    center: float | None = None,
    **train_overrides,
) -> dict:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "full"} if adapter == "full" else {"type": "lora", "r": 8, "alpha": 16},
        train={"batch_size": 4, "lr": 5e-3 if adapter == "lora" else 1e-3, **train_overrides},
    )
    cfg["method"] = "reward"
    cfg["data"]["eval_split"] = 0.0
    if center is not None:
        cfg["reward"] = {"center_rewards_coefficient": center}
    return cfg


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


# ------------------------------------------------------------------------------ parity with TRL


def _trl_stand_in(center: float | None) -> SimpleNamespace:
    """What RewardTrainer.compute_loss reads from `self`, for one process."""

    def same(x: Any, *args: Any, **kwargs: Any) -> Any:
        return x

    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather=same, gather_for_metrics=same),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _trl_inputs(pairs: list[Any], pad_id: int, margins: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """TRL's DataCollatorForPreference on prompt + answer ids: chosen rows, then rejected rows."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    examples = [
        {"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids}
        for p in pairs
    ]
    if margins is not None:
        for example, margin in zip(examples, margins.tolist(), strict=True):
            example["margin"] = margin
    return DataCollatorForPreference(pad_token_id=pad_id)(examples)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours.detach().double() - theirs.detach().double()).abs().max().item()
    scale = max(1.0, theirs.detach().abs().max().item())
    assert diff <= TOL * scale, f"{what}: max diff {diff} (scale {scale})"


@pytest.mark.parametrize(("use_margin", "center"), [(False, None), (True, None), (True, 0.05)])
def test_loss_and_gradients_match_trl_reward_trainer(
    use_margin, center, tiny_model_dirs, tokenizer, tmp_path
):
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
    from transformers import AutoConfig, LlamaForSequenceClassification

    from tunesmith.data.preference import build_preference_data
    from tunesmith.models.attention import choose_attention, packed_mask_kind
    from tunesmith.models.load import load_model
    from tunesmith.training.methods.reward import RewardModel, collate_reward_pairs

    model_dir = tiny_model_dirs["llama"]
    margins = [0.25 * i - 0.5 for i in range(5)] if use_margin else None
    cfg = load_config(
        _cfg(model_dir, _pairs_file(tmp_path / "p.jsonl", margins, n=5), tmp_path / "r", center=center)
    )
    pairs = build_preference_data(cfg.data, tokenizer, "reward").train
    attention = choose_attention("auto", "cpu")
    method = RewardModel()
    ours = method.wrap_model(load_model(model_dir, torch.float32, attention=attention), cfg)
    batch = collate_reward_pairs(pairs, tokenizer.pad_token_id, packed_mask_kind(attention))
    assert ("margin" in batch.tensors) == use_margin
    out = method.compute_loss(ours, batch.tensors)
    our_loss = out.loss_sum / len(pairs)

    used = {t for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids}
    pad_id = next(i for i in range(3, len(tokenizer)) if i not in used)  # never inside a sequence
    theirs = LlamaForSequenceClassification(AutoConfig.from_pretrained(model_dir, num_labels=1)).float()
    # Built with the causal LM's config (its embedding's padding_idx too); only the pad id that TRL's
    # collator pads with and the last-token lookup skips is one that no sequence holds (the config's
    # pad, <|im_end|>, ends every answer).
    theirs.config.pad_token_id = pad_id
    state = {k: v for k, v in ours.model.state_dict().items() if not k.startswith("lm_head")}
    missing, unexpected = theirs.load_state_dict(
        {**state, "score.weight": ours.score.weight.detach()}, strict=False
    )
    assert not missing and not unexpected
    inputs = _trl_inputs(pairs, pad_id, batch.tensors.get("margin"))
    stand_in = _trl_stand_in(center)
    trl_loss = trl_reward.RewardTrainer.compute_loss(stand_in, theirs, inputs)

    _assert_close(our_loss, trl_loss, "loss")
    our_params = dict(ours.named_parameters())  # the causal LM sits under `model.`, the head beside it
    names = [n for n, p in theirs.named_parameters()]
    ours_grads = torch.autograd.grad(
        our_loss, [our_params[n if n.startswith("score.") else f"model.{n}"] for n in names]
    )
    theirs_grads = torch.autograd.grad(trl_loss, list(theirs.parameters()))
    for name, a, b in zip(names, ours_grads, theirs_grads, strict=True):
        assert a is not None and b.abs().sum() > 0, name
        _assert_close(a, b, f"grad {name}")
    metrics = stand_in._metrics["train"]
    assert out.metrics["accuracy"].item() / len(pairs) == pytest.approx(metrics["accuracy"][-1], abs=1e-7)
    assert out.metrics["margin"].item() / len(pairs) == pytest.approx(metrics["margin"][-1], abs=TOL)


# ------------------------------------------------------------------------------ pieces


def test_last_token_positions_skip_padding_in_every_mask_layout():
    from tunesmith.data.packing import collate_packed
    from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
    from tunesmith.training.methods.reward import last_token_positions

    def sample(prompt: int, answer: int) -> TokenizedSample:
        ids = list(range(10, 10 + prompt + answer))
        return TokenizedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "x")

    rows = [[sample(2, 3), sample(1, 2)], [sample(3, 1)]]  # widths 8 and 4: the second row is padded
    for kind in ("none", "bool", "additive"):
        batch = collate_packed(rows, pad_id=0, block_mask=kind)
        positions, _ = last_token_positions(batch["labels"], batch["position_ids"])
        assert positions.tolist() == [4, 7, 8 + 3], kind


def test_head_is_seeded_small_normal_and_fp32(tiny_model_dirs):
    from tunesmith.models.load import load_model
    from tunesmith.training.methods.reward import RewardScorer

    model = load_model(tiny_model_dirs["qwen2"])
    before = torch.get_rng_state()
    a, b = RewardScorer(model, seed=0).score.weight, RewardScorer(model, seed=0).score.weight
    c = RewardScorer(model, seed=1).score.weight
    assert torch.equal(torch.get_rng_state(), before)  # the head's own generator, not the global one
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 64) and a.dtype == torch.float32
    assert 0.005 < float(a.detach().std()) < 0.05  # initializer_range 0.02, as transformers' score layer


def test_sft_optimizer_order_and_checkpoint_names_are_unchanged(tiny_model_dirs):
    """The loop now builds the optimizer from the wrapper: for SFT the same parameters, same order."""
    from tunesmith.config.schema import LoraAdapter
    from tunesmith.models.adapters import apply_adapter
    from tunesmith.models.load import load_model
    from tunesmith.training.losses import CausalLMWithLoss
    from tunesmith.training.methods.reward import RewardScorer
    from tunesmith.training.trainer_checkpoints import checkpointed_module, own_parameters

    model = apply_adapter(load_model(tiny_model_dirs["llama"]), LoraAdapter(r=4))
    wrapper = CausalLMWithLoss(model)
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]
    assert checkpointed_module(wrapper) is model and not own_parameters(wrapper)
    scorer = RewardScorer(model)
    assert [id(p) for p in scorer.parameters()][:-1] == [id(p) for p in model.parameters()]
    assert checkpointed_module(scorer) is scorer and list(own_parameters(scorer)) == ["score.weight"]


def test_margins_are_read_and_bad_ones_name_the_row(tokenizer, tmp_path):
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.errors import DataError
    from tunesmith.data.preference import build_preference_data
    from tunesmith.training.methods.reward import pair_margins

    good = _pairs_file(tmp_path / "m.jsonl", [0.5 * i for i in range(12)])
    built = build_preference_data(
        DataConfig(train=[{"path": str(good)}], eval_split=0.0), tokenizer, "reward"
    )
    assert sorted(p.margin for p in built.train) == [0.5 * i for i in range(12)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().replace('"margin": 1.0', '"margin": "high"'))
    with pytest.raises(DataError, match=r"bad\.jsonl:3.*margin: expected a number, got a string"):
        build_preference_data(DataConfig(train=[{"path": str(bad)}], eval_split=0.0), tokenizer, "reward")

    mixed = tmp_path / "mixed.jsonl"
    lines = good.read_text().splitlines()
    row = json.loads(lines[4])
    del row["margin"]
    mixed.write_text("\n".join([*lines[:4], json.dumps(row), *lines[5:]]) + "\n")
    built = build_preference_data(
        DataConfig(train=[{"path": str(mixed)}], eval_split=0.0, shuffle=False), tokenizer, "reward"
    )
    with pytest.raises(DataError, match=r"mixed\.jsonl:5: this pair has no margin, but 11 of 12"):
        pair_margins(built.train)


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained_run(tiny_model_dirs, tmp_path_factory) -> Path:
    """A LoRA reward model trained on the separable pairs (18 steps)."""
    root = tmp_path_factory.mktemp("reward")
    run = root / "run"
    cfg = _cfg(tiny_model_dirs["qwen2"], _pairs_file(root / "p.jsonl"), run, epochs=6)
    train(load_config(cfg), show_progress=False)
    return run


def test_separable_pairs_are_learned_and_scored_in_order(trained_run):
    import tunesmith

    rows = _rows(trained_run)
    assert len(rows) == 18
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"], [r["loss"] for r in rows]
    assert min(r["accuracy"] for r in rows[-3:]) > 0.9
    assert rows[-1]["margin"] > 0 and rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]
    info = json.loads((trained_run / "run.json").read_text())
    assert info["method"] == "reward" and info["kind"] == "adapter"
    assert (trained_run / "adapter" / info["head"]).is_file()

    scored = tunesmith.score(
        trained_run, rows=[{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    )
    assert all(s["chosen_score"] > s["rejected_score"] for s in scored), scored
    one = tunesmith.score(trained_run, PAIRS[3][0], PAIRS[3][1])
    assert one == pytest.approx(scored[3]["chosen_score"], abs=TOL)


def test_cli_scores_one_response_and_a_file(trained_run, tmp_path, capsys):
    import tunesmith
    from tunesmith.cli.main import main

    prompt, chosen, _ = PAIRS[0]
    assert main(["score", str(trained_run), "--prompt", prompt, "--response", chosen]) == 0
    printed = float(capsys.readouterr().out.strip())
    assert printed == pytest.approx(tunesmith.score(trained_run, prompt, chosen), abs=1e-5)

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": prompt, "response": chosen})
        + "\n\n"
        + json.dumps({"prompt": prompt, "chosen": chosen, "rejected": PAIRS[0][2]})
        + "\n"
    )
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(trained_run), "--file", str(rows), "--out", str(out)]) == 0
    first, second = map(json.loads, out.read_text().splitlines())
    assert first["score"] == pytest.approx(printed, abs=1e-5)
    assert second["chosen_score"] == pytest.approx(printed, abs=1e-5)
    assert "1 pairs: accuracy 1.0000" in capsys.readouterr().err

    rows.write_text(json.dumps({"prompt": prompt, "response": ""}) + "\n")
    assert main(["score", str(trained_run), "--file", str(rows)]) == 2
    assert "rows.jsonl:1: response: empty" in capsys.readouterr().err


def test_chat_with_a_reward_run_is_refused_and_points_to_score(trained_run, capsys):
    from tunesmith.cli.main import main

    assert main(["chat", str(trained_run), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "is a reward model" in err and f"tunesmith score {trained_run}" in err


def test_scoring_a_run_of_another_method_is_refused(tiny_model_dirs, chat_file, tmp_path):
    import tunesmith
    from tunesmith.training.errors import RunDirError

    run = tmp_path / "sft"
    train(load_config(base_config(tiny_model_dirs["llama"], chat_file, run, train={"max_steps": 1})), False)
    with pytest.raises(RunDirError, match="trained with method 'sft'; scoring needs a reward model run"):
        tunesmith.score(run, "hi", "hello")


def test_score_equals_the_training_forward(tiny_model_dirs, tmp_path):
    """Run A stops after 2 steps; run B logs step 3, computed with A's final weights: tunesmith.score on
    A must give B's step-3 rewards, accuracy and loss (margins and centring included)."""
    import tunesmith

    n = 8
    margins = [0.1 * i for i in range(n)]
    data = _pairs_file(tmp_path / "p.jsonl", margins, n=n)
    model_dir = tiny_model_dirs["llama"]
    common = dict(adapter="full", center=0.1, batch_size=n, epochs=10, scheduler="constant")
    train(load_config(_cfg(model_dir, data, tmp_path / "a", max_steps=2, **common)), show_progress=False)
    train(load_config(_cfg(model_dir, data, tmp_path / "b", max_steps=3, **common)), show_progress=False)
    step3 = _rows(tmp_path / "b")[2]

    assert (tmp_path / "a" / "model" / "head.safetensors").is_file()
    scored = tunesmith.score(
        tmp_path / "a", rows=[{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS[:n]]
    )
    chosen = torch.tensor([s["chosen_score"] for s in scored], dtype=torch.float64)
    rejected = torch.tensor([s["rejected_score"] for s in scored], dtype=torch.float64)
    loss = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor(margins, dtype=torch.float64))
    loss = loss + 0.1 * (chosen + rejected) ** 2
    assert float(chosen.mean()) == pytest.approx(step3["rewards/chosen"], abs=TOL)
    assert float(rejected.mean()) == pytest.approx(step3["rewards/rejected"], abs=TOL)
    assert float((chosen > rejected).double().mean()) == step3["accuracy"]
    assert float(loss.mean()) == pytest.approx(step3["loss"], abs=TOL)


def test_accumulation_equals_the_bigger_batch(tiny_model_dirs, tmp_path):
    data = _pairs_file(tmp_path / "p.jsonl", [0.2 * i for i in range(12)])
    model_dir = tiny_model_dirs["mistral"]
    big = train(load_config(_cfg(model_dir, data, tmp_path / "a", center=0.01, batch_size=4)), False)
    acc = train(
        load_config(_cfg(model_dir, data, tmp_path / "b", center=0.01, batch_size=2, grad_accum=2)), False
    )
    assert big.steps == acc.steps == 3
    assert big.losses == pytest.approx(acc.losses, abs=1e-6)
    for a, b in zip(_rows(tmp_path / "a"), _rows(tmp_path / "b"), strict=True):
        for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_resume_is_exact_and_restores_the_head(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file

    data = _pairs_file(tmp_path / "p.jsonl", n=6)
    model_dir = tiny_model_dirs["llama"]
    common = dict(epochs=2, batch_size=2)
    straight = train(load_config(_cfg(model_dir, data, tmp_path / "a", **common)), show_progress=False)
    first = train(load_config(_cfg(model_dir, data, tmp_path / "b", **common)), False, stop_after_step=2)
    checkpoint = load_file(tmp_path / "b" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert "score.weight" in checkpoint  # mid-epoch (3 steps an epoch), with the head
    assert len(straight.losses) == 6
    second = train(load_config(_cfg(model_dir, data, tmp_path / "b", resume="auto", **common)), False)
    assert first.losses + second.losses == straight.losses
    heads = [load_file(tmp_path / r / "adapter" / "head.safetensors")["score.weight"] for r in ("a", "b")]
    assert torch.equal(*heads)
    assert not torch.equal(heads[0], checkpoint["score.weight"])  # the head kept training after step 2


def test_example_config_and_pairs_load(tokenizer, monkeypatch):
    """examples/reward.yaml is valid and every example pair tokenizes (none skipped or dropped)."""
    from tunesmith.data.preference import build_preference_data

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example's paths are repo-relative
    cfg = load_config("examples/reward.yaml")
    assert cfg.method == "reward" and cfg.reward.center_rewards_coefficient == 0.01
    built = build_preference_data(cfg.data, tokenizer, "reward")
    assert len(built.train) + len(built.eval) == 16
    assert all(pair.chosen_ids and pair.rejected_ids for pair in built.train)
    assert math.isclose(cfg.data.eval_split, 0.125)
