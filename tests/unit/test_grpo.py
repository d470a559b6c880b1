"""GRPO on the one loop: prompt data, rollouts on the live weights, TRL parity, learning, exact resume.

Most tests use a tiny model over a character-level vocabulary (99 tokens, ChatML template): with
SmolLM2's 49k tokens a random model's samples are near-uniform over the vocabulary, so no short
run could find a rewarded token; over characters it can.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import base_config, tiny_config
from tunesmith.config.load import load_config
from tunesmith.config.schema import LoraAdapter
from tunesmith.data.errors import DataError
from tunesmith.data.prompts import build_prompt_data
from tunesmith.data.validate import BadRowError
from tunesmith.infer.generate import generate_batch
from tunesmith.models.adapters import apply_adapter
from tunesmith.models.load import load_model_and_tokenizer
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.training.loop import enable_activation_checkpointing, train
from tunesmith.training.methods.grpo import GRPO, Rollout
from tunesmith.training.rollout import Completions, generation_mode, sample_completions

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
EOS = 2


def _char_tokenizer(folder: Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIALS[1:],
    )
    template = Path(__file__).resolve().parents[2] / "src/tunesmith/data/builtin_templates/chatml.jinja"
    tokenizer.chat_template = template.read_text()
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("char-llama")
    tokenizer = _char_tokenizer(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


PROMPTS = [f"Reply with a digit, please ({word})." for word in ("one", "two", "three", "four", "five", "six")]


def _prompts_file(path: Path, prompts: list[str] = PROMPTS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, prompt in enumerate(prompts):
            handle.write(json.dumps({"prompt": prompt, "answer": str(i)}) + "\n")
    return path


def _cfg(model_dir: Path, data: Path, out: Path, grpo: dict | None = None, **train_overrides: Any) -> dict:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "lora", "r": 8, "alpha": 16},
        train={"batch_size": 2, "lr": 1e-2, "scheduler": "constant", **train_overrides},
    )
    cfg["method"] = "grpo"
    cfg["grpo"] = {
        "num_generations": 4,
        "max_completion_length": 6,
        "rewards": [{"function": "regex", "args": {"pattern": "[0-9]"}}],
        **(grpo or {}),
    }
    return cfg


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


# ------------------------------------------------------------------------------------------ data


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _data_cfg(path: Path, **extra: Any) -> Any:
    cfg = load_config(
        {
            "method": "grpo",
            "data": {"train": [{"path": str(path)}], "seq_len": 64, **extra},
            "grpo": {"max_completion_length": 16, "rewards": [{"function": "exact_match"}]},
        }
    )
    return cfg.data


def test_prompt_rows_load_with_their_columns(tokenizer, tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2 + 2?", "answer": 4, "level": "easy"},
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                "answer": "hi",
            },
            {"messages": [{"role": "user", "content": "Name a colour."}], "answer": "blue"},
        ],
    )
    built = build_prompt_data(_data_cfg(path, shuffle=False), tokenizer, 16, {"answer": "grpo.rewards[0]"})
    first, second, third = built.train
    assert first.raw == "What is 2 + 2?" and first.columns == {"answer": 4, "level": "easy"}
    assert second.raw[0]["role"] == "system" and third.columns == {"answer": "blue"}
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(first.prompt_ids) == expected  # what the model sees at inference
    assert str(first.source).endswith("p.jsonl:1") and str(third.source).endswith("p.jsonl:3")


def test_bad_rows_name_their_line_and_are_skipped_on_request(tokenizer, tmp_path):
    good = {"prompt": "Fine?", "answer": "yes"}
    rows = [
        good,
        {"question": "no prompt key", "answer": "x"},
        {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "answer": "A",
        },
        {"prompt": "Where is my answer?"},
        {"prompt": "Reserved column", "answer": "a", "completions": []},
        {"prompt": " ".join(str(i) for i in range(60)), "answer": "long"},
        "{not json",
        good | {"prompt": "Also fine?"},
    ]
    path = _write(tmp_path / "p.jsonl", rows)
    required = {"answer": "grpo.rewards[0] (exact_match)"}
    with pytest.raises(BadRowError, match=r'p\.jsonl:2: missing key "prompt"'):
        build_prompt_data(_data_cfg(path), tokenizer, 16, required)
    built = build_prompt_data(
        _data_cfg(path, on_error="skip", max_dropped_fraction=0.9), tokenizer, 16, required
    )
    assert len(built.train) == 2
    skipped = {issue.ref.line: issue.reason for issue in built.report.skipped}
    assert set(skipped) == {2, 3, 4, 5, 7}
    assert "must end with a user or tool message" in skipped[3] and "got assistant" in skipped[3]
    assert 'missing column "answer" (read by grpo.rewards[0] (exact_match))' in skipped[4]
    assert 'column "completions"' in skipped[5]
    assert "invalid JSON" in skipped[7]
    (dropped,) = built.report.dropped
    assert (
        dropped.ref.line == 6 and "more than data.seq_len - grpo.max_completion_length = 48" in dropped.reason
    )


def test_other_formats_and_no_room_for_a_prompt_are_refused(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q?", "answer": "a"}])
    cfg = load_config(
        {
            "method": "grpo",
            "data": {"train": [{"path": str(path), "format": "alpaca"}], "seq_len": 64},
            "grpo": {"rewards": [{"function": "exact_match"}]},
        }
    )
    with pytest.raises(DataError, match=r"data.train\[0\].format: method grpo reads prompts"):
        build_prompt_data(cfg.data, tokenizer, 16)
    with pytest.raises(DataError, match="data.seq_len \\(64\\) leaves no room"):
        build_prompt_data(_data_cfg(path), tokenizer, 64)


# -------------------------------------------------------------------------------------- rollouts


def _policy(model_dir: Path, attention: str = VARLEN, dropout: float = 0.1) -> Any:
    """A LoRA policy as the loop trains it: packed attention, checkpointing, train mode, adapter moved off 0."""
    model, tokenizer, _ = load_model_and_tokenizer(str(model_dir), attention=attention)
    model = apply_adapter(model, LoraAdapter(r=4, alpha=8, dropout=dropout))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    enable_activation_checkpointing(model)
    model.enable_input_require_grads()
    return model.train(), tokenizer


def _scorer(model: Any, temperature: float = 1.0) -> Any:
    from tunesmith.training.methods.grpo import CompletionScorer

    return CompletionScorer(model, chunk_size=16, temperature=temperature)


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _fresh_sdpa_copy(model_dir: Path, policy: Any) -> Any:
    """A model loaded with sdpa carrying the policy's weights, in eval mode: the reference generator."""
    fresh, _, _ = load_model_and_tokenizer(str(model_dir), attention="sdpa")
    fresh = apply_adapter(fresh, LoraAdapter(r=4, alpha=8, dropout=0.1))
    fresh.load_state_dict(policy.state_dict())
    return fresh.eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollout_equals_a_fresh_sdpa_model_and_packed_attention_would_not(temperature, char_model_dir):
    policy, tokenizer = _policy(char_model_dir)
    prompts = [_chat_ids(tokenizer, "Hi"), _chat_ids(tokenizer, "What is the colour of the sky?")]
    settings = dict(max_new_tokens=12, stop_ids=[EOS], pad_id=EOS, temperature=temperature, seed=7)
    done = sample_completions(
        _scorer(policy),
        prompts,
        num_generations=2,
        max_new_tokens=12,
        temperature=temperature,
        top_p=1.0,
        seed=7,
        stop_ids=[EOS],
        pad_id=EOS,
    )
    expected = generate_batch(
        _fresh_sdpa_copy(char_model_dir, policy), [p for p in prompts for _ in (0, 1)], **settings
    )
    assert done.completion_ids == [ids for ids, _ in expected]
    assert done.stopped == [stopped for _, stopped in expected]
    assert done.prompt_ids == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert sum(map(len, done.completion_ids)) > 16  # a non-trivial comparison
    # The same weights generating through the packed kernel under a KV cache go wrong:
    with torch.no_grad():
        wrong = generate_batch(policy.eval(), [p for p in prompts for _ in (0, 1)], **settings)
    assert [ids for ids, _ in wrong] != done.completion_ids


def test_rollout_leaves_training_exactly_as_it_was(char_model_dir):
    """Attention, checkpointing, modes, generation defaults, RNG: all back; so are the training numbers."""
    policy, tokenizer = _policy(char_model_dir, dropout=0.3)
    scorer = _scorer(policy, temperature=0.9)
    base = policy.get_base_model()
    checkpointed = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert checkpointed
    defaults = base.generation_config
    from tunesmith.data.conversation import RowRef
    from tunesmith.data.packing import collate_packed
    from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample

    ids = _chat_ids(tokenizer, "Tell me something.")
    answer = tokenizer("Something!", add_special_tokens=False)["input_ids"] + [EOS]
    sample = TokenizedSample(ids + answer, [IGNORE_INDEX] * len(ids) + answer, RowRef("mem", 1))
    batch = collate_packed([[sample, sample]], EOS, "none")

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(5)  # dropout is on: equal numbers need equal RNG streams
        logps, _ = scorer(**batch)
        loss = -logps.sum()
        grads = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad])
        return loss.detach(), grads

    before, before_grads = loss_and_grads()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    sample_completions(
        scorer,
        [ids],
        num_generations=3,
        max_new_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=1,
        stop_ids=[EOS],
        pad_id=EOS,
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert base.config._attn_implementation == VARLEN
    assert all(m.gradient_checkpointing for m in checkpointed)
    assert all(m.training for m in policy.modules())
    assert base.generation_config is defaults
    after, after_grads = loss_and_grads()
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(before_grads, after_grads, strict=True))


def test_generation_mode_restores_on_error(char_model_dir):
    policy, _ = _policy(char_model_dir)
    with pytest.raises(RuntimeError, match="boom"), generation_mode(_scorer(policy)):
        assert not policy.training and policy.get_base_model().config._attn_implementation == "sdpa"
        raise RuntimeError("boom")
    assert policy.training and policy.get_base_model().config._attn_implementation == VARLEN


def test_sampling_is_fixed_by_its_seed(char_model_dir):
    policy, tokenizer = _policy(char_model_dir)
    prompts = [_chat_ids(tokenizer, "Hello")]

    def sample(seed: int) -> list[list[int]]:
        return sample_completions(
            _scorer(policy),
            prompts,
            num_generations=4,
            max_new_tokens=10,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
            stop_ids=[EOS],
            pad_id=EOS,
        ).completion_ids

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first
    assert len({tuple(ids) for ids in first}) > 1  # a group's completions differ from each other


# ------------------------------------------------------------------------------------ TRL parity


def _trl_stand_in(beta: float, loss_type: str, max_completion_length: int) -> SimpleNamespace:
    """What GRPOTrainer._compute_loss and _get_per_token_logps_and_entropies read from `self`."""
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            autocast=nullcontext,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            reduce=lambda x, reduction="sum": x,
            num_processes=1,
            is_main_process=True,
            sync_gradients=True,
        ),
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=max_completion_length,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def _trl_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """TRL's inline advantage steps (scale_rewards="group")."""
    mean = rewards.view(-1, group).mean(1).repeat_interleave(group)
    std = rewards.view(-1, group).std(1).repeat_interleave(group)
    return (rewards - mean) / (std + 1e-4)


def _padded(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, cols], mask[r, cols] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize(
    ("loss_type", "beta"), [("grpo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.0), ("dr_grpo", 0.04)]
)
def test_loss_and_gradients_match_trl(loss_type, beta, char_model_dir, tmp_path):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from trl.trainer.utils import add_fused_lm_head

    group, max_len, temperature = 3, 9, 0.7
    settings = {"num_generations": group, "max_completion_length": max_len, "temperature": temperature}
    settings |= {"epsilon": 0.2, "epsilon_high": 0.28, "beta": beta, "loss_type": loss_type}
    cfg = load_config(_cfg(char_model_dir, _prompts_file(tmp_path / "p.jsonl"), tmp_path / "run", settings))
    policy, tokenizer = _policy(char_model_dir, dropout=0.0)
    trl_policy = copy.deepcopy(policy)
    method = GRPO()
    method.prepare_data(cfg, tokenizer)
    method.batches(None, cfg, EOS, VARLEN)  # type: ignore[arg-type]
    scorer = method.wrap_model(policy, cfg)

    prompts = method.train_prompts[:2]
    texts = ["7", "no digits here", "4 and 5", "x", "12345678", "nine"]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    stopped = [len(ids) < max_len for ids in completion_ids]
    completion_ids = [ids + [EOS] if stop else ids for ids, stop in zip(completion_ids, stopped, strict=True)]
    prompt_ids = [p.prompt_ids for p in prompts for _ in range(group)]
    assert len(set(map(len, prompt_ids))) > 1  # TRL's batch is left-padded
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.5, -1.0])
    rollout = Rollout(
        prompts, Completions(prompt_ids, completion_ids, stopped), texts, rewards, rewards[:, None]
    )
    out = method.policy_loss(scorer, rollout)
    ours = out.loss_sum / out.count
    leaves = [p for p in policy.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours, leaves)

    base = trl_policy.get_base_model()
    base.set_attn_implementation("sdpa")  # TRL runs a padded batch through the model's own attention
    add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy"))
    stand_in = _trl_stand_in(beta, loss_type, max_len)
    stand_in._get_per_token_logps_and_entropies = functools.partial(
        trl_grpo.GRPOTrainer._get_per_token_logps_and_entropies, stand_in
    )
    p_ids, p_mask = _padded(prompt_ids, EOS, left=True)
    c_ids, c_mask = _padded(completion_ids, EOS, left=False)
    inputs = {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "completion_ids": c_ids,
        "completion_mask": c_mask,
        "advantages": _trl_advantages(rewards, group),
    }
    if beta:
        with torch.no_grad(), trl_policy.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = stand_in._get_per_token_logps_and_entropies(
                trl_policy, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), c_ids.shape[1]
            )
    theirs = trl_grpo.GRPOTrainer._compute_loss(stand_in, trl_policy, inputs)
    their_leaves = [p for p in trl_policy.parameters() if p.requires_grad]
    their_grads = torch.autograd.grad(theirs, their_leaves)

    assert abs(float(ours) - float(theirs)) <= 1e-5 * max(1.0, abs(float(theirs)))
    for a, b in zip(ours_grads, their_grads, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    if beta:  # the reference differs from the policy, so the KL term is exercised
        assert stand_in._metrics["train"]["kl"][-1] > 1e-3
        assert float(out.metrics["kl"]) > 1e-3


# ------------------------------------------------------------------------------- on the one loop

EVAL_PROMPTS = [f"A digit, now ({word})." for word in ("seven", "eight", "nine", "ten")]


def test_toy_task_raises_the_reward_on_train_and_held_out_prompts(char_model_dir, tmp_path):
    """'Reply with a digit', rewarded by the regex built-in: from about 1 in 3 completions to all."""
    run = tmp_path / "run"
    cfg = _cfg(
        char_model_dir,
        _prompts_file(tmp_path / "p.jsonl"),
        run,
        {"num_generations": 8, "max_completion_length": 4, "beta": 0.02},
        max_steps=10,
        eval_every=1,
    )
    cfg["adapter"] = {"type": "full"}
    cfg["data"]["eval"] = [{"path": str(_prompts_file(tmp_path / "e.jsonl", EVAL_PROMPTS))}]
    train(load_config(cfg), show_progress=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward"] for row in lines if "reward" in row]
    held_out = [-row["eval_loss"] for row in lines if "eval_loss" in row]  # eval loss: minus the mean reward
    assert len(rewards) == len(held_out) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.4, rewards
    assert held_out[-1] > held_out[0] + 0.4, held_out
    assert held_out[-1] >= 0.9


def test_resume_is_exact_and_metrics_and_completions_are_written(char_model_dir, tmp_path):
    data = _prompts_file(tmp_path / "p.jsonl", PROMPTS[:4])  # 2 micro-batches an epoch
    settings = {"loss_type": "dr_grpo", "beta": 0.04, "log_completions_every": 2, "temperature": 0.9}

    def run(out: str, **extra: Any) -> Any:
        cfg = _cfg(char_model_dir, data, tmp_path / out, settings, epochs=2, **extra)
        return cfg

    straight = train(load_config(run("a")), show_progress=False)
    first = train(load_config(run("b")), show_progress=False, stop_after_step=3)  # inside epoch 2
    second = train(load_config(run("b", resume="auto")), show_progress=False)
    assert straight.steps == 4 and len(first.losses) == 3
    assert first.losses + second.losses == straight.losses
    assert any(abs(loss) > 1e-4 for loss in straight.losses)  # dr_grpo weighs completions by their length
    rows = _rows(tmp_path / "a")
    assert [r["reward"] for r in rows] == [r["reward"] for r in _rows(tmp_path / "b")]
    assert {"reward", "reward_std", "rewards/regex/mean", "rewards/regex/std", "kl", "clip_ratio"} <= set(
        rows[0]
    )
    assert {"completion_length", "completions/clipped_ratio", "frac_reward_zero_std"} <= set(rows[0])
    assert all(0 < r["completion_length"] <= 6 for r in rows) and rows[-1]["kl"] > 0
    logged = [json.loads(line) for line in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    assert sorted({row["micro_batch"] for row in logged}) == [0, 2]
    assert len(logged) == 2 * 2 * 4  # 2 prompts of each logged micro-batch, 4 completions each
    assert logged[0]["prompt"] in PROMPTS[:4] and isinstance(logged[0]["completion"], str)
    assert logged[0]["rewards"]["regex"] == logged[0]["reward"] in (0.0, 1.0)


def test_example_config_and_prompts_load(tokenizer, monkeypatch):
    """examples/grpo.yaml is valid, its reward functions load and every example prompt tokenizes."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example's paths are repo-relative
    cfg = load_config("examples/grpo.yaml")
    assert cfg.method == "grpo" and cfg.grpo is not None
    method = GRPO()
    prepared = method.prepare_data(cfg, tokenizer)
    report = prepared.data.report
    assert not report.skipped and not report.dropped
    assert len(method.train_prompts) + len(method.eval_prompts) == report.rows_read >= 24
    assert [r.name for r in method.rewards] == [r.function for r in cfg.grpo.rewards]
    prompt = method.train_prompts[0]
    g = cfg.grpo.num_generations
    answer = tokenizer(str(prompt.columns["answer"]), add_special_tokens=False)["input_ids"]
    completions = Completions([prompt.prompt_ids] * g, [[*answer, tokenizer.eos_token_id]] * g, [True] * g)
    rollout = method.score([prompt], completions)  # the reward functions run on this data's columns
    torch.testing.assert_close(rollout.rewards, torch.full((g,), 1.5))  # right, and a bare number
