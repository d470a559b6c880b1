"""KTO: its rows and their problems, its batches, parity with TRL, and the method on the one loop."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError
from tunesmith.data.kto import balance_advice, build_kto_data, kto_record, marked_kto, read_kto_samples
from tunesmith.data.kto_tokenize import TokenizedKTO
from tunesmith.data.validate import BadRowError
from tunesmith.training.loop import train
from tunesmith.training.methods.kto import KTO, KTOScorer, collate_kto
from tunesmith.training.metrics import step_metric_means

PARITY_TOL = 1e-5
"""fp32 parity with TRL: the loss absolutely, each gradient tensor relative to its largest entry."""

GOOD = [
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 is 4.", "label": True},
    {"prompt": "Name a colour.", "completion": "Colours are many, it depends, maybe some.", "label": False},
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Italy?"},
        ],
        "completion": [{"role": "assistant", "content": "Rome."}],
        "label": True,
    },
    {
        "messages": [
            {"role": "user", "content": "How many legs has a cat?"},
            {"role": "assistant", "content": "Some."},
        ],
        "label": False,
    },
]


def _write(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def _data_cfg(path: Path, **overrides: Any) -> Any:
    cfg = base_config(Path("unused"), path, Path("unused-out"), data={"seq_len": 256, **overrides})
    cfg["method"] = "kto"
    return load_config(cfg).data


# --------------------------------------------------------------------------------------- rows


def test_every_layout_is_read_with_its_label(tmp_path):
    result = read_kto_samples(str(_write(tmp_path / "k.jsonl", GOOD)))
    assert result.formats == {str(tmp_path / "k.jsonl"): "kto"}
    assert [s.desirable for s in result.samples] == [True, False, True, False]
    first, _, system, messages = result.samples
    assert [(m.role, m.content) for m in first.prompt + first.completion] == [
        ("user", "What is 2 + 2?"),
        ("assistant", "2 + 2 is 4."),
    ]
    assert [m.role for m in system.prompt] == ["system", "user"]
    assert [(m.role, m.content) for m in messages.completion] == [("assistant", "Some.")]
    assert [str(s.source) for s in result.samples] == [f"{tmp_path / 'k.jsonl'}:{i}" for i in range(1, 5)]


def test_csv_labels_are_the_words_true_and_false(tmp_path):
    path = tmp_path / "k.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerows(
            [["prompt", "completion", "label"], ["Hi?", "Hello.", "true"], ["Hi?", "Go away.", "False"]]
        )
        writer.writerow(["Hi?", "Hm.", "yes"])
    result = read_kto_samples(str(path), on_error="skip")
    assert [s.desirable for s in result.samples] == [True, False]
    assert [str(i) for i in result.issues] == [
        f'{path}:4: label: expected true (desirable) or false (undesirable), got "yes"'
    ]


BAD_ROWS = [
    (
        {"prompt": "Q?", "completion": "A.", "label": 1},
        "label: expected true (desirable) or false (undesirable), got 1",
    ),
    ({"prompt": "Q?", "completion": "A.", "label": "true"}, 'got "true"'),
    ({"prompt": "Q?", "completion": "A.", "label": None}, "got null"),
    ({"prompt": "Q?", "completion": "A."}, 'missing key "label"'),
    ({"prompt": "Q?", "completion": "", "label": True}, "completion: empty"),
    ({"prompt": "Q?", "completion": [], "label": True}, "completion: empty array"),
    (
        {"prompt": "Q?", "completion": [{"role": "assistant", "content": " "}], "label": True},
        "completion[0].content: empty assistant message",
    ),
    (
        {"prompt": "Q?", "completion": [{"role": "user", "content": "x"}], "label": True},
        "completion[0]: a completion holds assistant messages",
    ),
    ({"completion": "A.", "label": True}, 'missing key "prompt"'),
    (
        {"messages": [{"role": "user", "content": "Q?"}], "label": True},
        "messages[0]: the messages of a KTO row end with the assistant answer",
    ),
    (
        {"prompt": [{"role": "assistant", "content": "A."}], "completion": "B.", "label": True},
        "prompt[0]: the prompt must end with a user or tool message",
    ),
    (
        {"messages": [{"role": "user", "content": "Q?"}], "completion": "A.", "label": True},
        "give either messages + label or prompt + completion + label",
    ),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS)
def test_a_bad_row_is_reported_with_file_and_line(row, reason, tmp_path):
    path = _write(tmp_path / "k.jsonl", [GOOD[0], row, GOOD[1]])
    with pytest.raises(BadRowError) as caught:
        read_kto_samples(str(path))
    assert str(caught.value.issue).startswith(f"{path}:2: ")
    assert reason in caught.value.issue.reason
    skipped = read_kto_samples(str(path), on_error="skip")
    assert [str(i.ref) for i in skipped.issues] == [f"{path}:2"]
    assert len(skipped.samples) == 2


def test_skip_policy_and_the_dropped_budget_apply(tmp_path, tokenizer):
    rows = [GOOD[0], GOOD[1], {"prompt": "Q?", "completion": "A.", "label": "no"}, "{not json", *GOOD[2:]]
    path = _write(tmp_path / "k.jsonl", rows)
    with pytest.raises(BadRowError, match=r"k\.jsonl:3: label"):
        build_kto_data(_data_cfg(path), tokenizer)
    built = build_kto_data(_data_cfg(path, on_error="skip", shuffle=False), tokenizer)
    assert [str(i.ref) for i in built.report.skipped] == [f"{path}:3", f"{path}:4"]
    assert len(built.train) == 4
    with pytest.raises(DataError, match="max_dropped_fraction"):
        build_kto_data(_data_cfg(path, on_error="skip", max_dropped_fraction=0.2), tokenizer)


def test_a_completion_truncated_away_by_seq_len_is_dropped_and_reported(tmp_path, tokenizer):
    long_answer = " ".join(["word"] * 60)
    rows = [
        GOOD[0],
        {"prompt": "Q?", "completion": long_answer, "label": True},
        {"prompt": "Tell me. " * 30, "completion": "No.", "label": False},
        GOOD[1],
    ]
    path = _write(tmp_path / "k.jsonl", rows)
    built = build_kto_data(_data_cfg(path, seq_len=48, shuffle=False), tokenizer)
    assert [str(i.ref) for i in built.report.dropped] == [f"{path}:2"]
    assert "completion truncated away by seq_len 48" in built.report.dropped[0].reason
    kept = {str(e.source): e for e in built.train}
    assert set(kept) == {f"{path}:1", f"{path}:3", f"{path}:4"}
    cut = kept[f"{path}:3"]
    assert cut.truncated and len(cut.prompt_ids) + len(cut.completion_ids) == 48
    assert built.report.truncated == 1
    assert "1 dropped" in built.report.summary()


def test_format_auto_detects_kto_rows_and_refuses_other_files(tmp_path):
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}])
    chat = _write(tmp_path / "c.jsonl", [{"messages": GOOD[3]["messages"]}])
    unknown = _write(tmp_path / "u.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(DataError, match="holds preference pairs .* Method kto needs rows with prompt"):
        read_kto_samples(str(pairs))
    with pytest.raises(DataError, match="holds messages rows without a label, which train with method sft"):
        read_kto_samples(str(chat))
    with pytest.raises(DataError, match="no row of .* is a KTO row .* 'question', 'answer'"):
        read_kto_samples(str(unknown))
    with pytest.raises(DataError, match=r"data.train\[0\].format: method kto reads KTO rows"):
        read_kto_samples(str(chat), "messages")
    explicit = read_kto_samples(str(chat), "kto", on_error="skip")  # format: kto judges each row
    assert 'missing key "label"' in explicit.issues[0].reason


def test_balance_advice_follows_the_papers_range():
    assert balance_advice(10, 10, 1.0, 1.0) is None
    assert balance_advice(12, 10, 1.0, 1.0) is None  # ratio 1.2 is within [1, 4/3]
    advice = balance_advice(30, 10, 1.0, 1.0)
    assert advice is not None and "kto.desirable_weight in [0.33, 0.44]" in advice
    assert "kto.undesirable_weight in [2.25, 3.00]" in advice
    assert "no undesirable" in (balance_advice(5, 0, 1.0, 1.0) or "")


def test_example_config_loads_and_every_row_tokenizes(tokenizer, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the example's paths are repo-relative
    cfg = load_config("examples/kto.yaml")
    assert cfg.method == "kto"
    built = build_kto_data(cfg.data, tokenizer, (cfg.kto.desirable_weight, cfg.kto.undesirable_weight))
    report = built.report
    assert report.rows_read == 20 and not report.skipped and not report.dropped and not report.truncated
    assert len(built.train) + len(built.eval) == 20
    assert report.desirable + report.undesirable == len(built.train) and report.desirable >= 8
    assert all(e.prompt_ids and e.completion_ids for e in built.train + built.eval)
    shown = marked_kto(tokenizer, built.train[0])
    assert shown.count("[[") == 1 and "<|im_end|>]]" in shown
    record = kto_record(tokenizer, built.train[0])
    assert record["labels"][: len(record["prompt_ids"])] == [-100] * len(record["prompt_ids"])
    assert record["labels"][len(record["prompt_ids"]) :] == record["completion_ids"]


# ------------------------------------------------------------------------------------ batches


def _example(prompt: list[int], completion: list[int], desirable: bool, line: int) -> TokenizedKTO:
    return TokenizedKTO(prompt, completion, desirable, RowRef("mem", line))


def _sequences(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


def test_each_prompt_meets_the_previous_examples_completion_in_one_row():
    examples = [_example([10 + i] * 3, [20 + i] * (i + 1), i % 2 == 0, i) for i in range(3)]
    mb = collate_kto(examples, pad_id=0, block_mask="none", seq_len=64)
    seqs = _sequences(mb.tensors)
    assert [ids for ids, _ in seqs] == [
        [10, 10, 10, 20],
        [11, 11, 11, 21, 21],
        [12, 12, 12, 22, 22, 22],
        [10, 10, 10, 22, 22, 22],  # TRL's rotation: x_1 with y_n, x_2 with y_1, ...
        [11, 11, 11, 20],
        [12, 12, 12, 21, 21],
    ]
    for ids, labels in seqs:  # only completion tokens are scored
        assert labels == [-100 if t < 20 else t for t in ids]
    assert int(mb.tensors["kto_split"]) == 4 + 5 + 6
    assert mb.tensors["kto_desirable"].tolist() == [True, False, True]
    assert (mb.units, mb.trained_tokens) == (3, 6)


def test_a_one_example_micro_batch_borrows_a_completion_and_long_pairs_cut_the_prompt():
    alone, before = _example([1] * 6, [2, 2], True, 1), _example([3], [4] * 5, False, 2)
    seqs = _sequences(collate_kto([alone], 0, "none", seq_len=8, borrowed=before).tensors)
    assert [ids for ids, _ in seqs] == [[1] * 6 + [2, 2], [1] * 3 + [4] * 5]


def test_precompute_ref_and_a_batch_of_one_are_refused(tiny_model_dirs, tmp_path, tokenizer):
    data = _write(tmp_path / "k.jsonl", GOOD)
    cfg = _cfg(tiny_model_dirs["llama"], data, tmp_path / "run", kto={"precompute_ref": True})
    with pytest.raises(ValueError, match="kto.precompute_ref is not supported"):
        KTO().prepare_data(load_config(cfg), tokenizer)
    cfg = _cfg(tiny_model_dirs["llama"], data, tmp_path / "run", batch_size=1)
    with pytest.raises(ValueError, match="train.batch_size: KTO needs at least 2 examples per micro-batch"):
        KTO().prepare_data(load_config(cfg), tokenizer)


# ------------------------------------------------------------------------------ parity with TRL

PARITY_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}: what colour is the sky at noon?"}],
        "completion": [{"role": "assistant", "content": answer}],
        "label": label,
    }
    for i, (answer, label) in enumerate(
        [
            ("It is blue.", True),
            ("Maybe green, or purple, it is hard to say really.", False),
            ("Blue, on a clear day.", True),
            ("Nobody knows.", False),
            ("The sky is blue at noon when there are no clouds.", True),
        ]
    )
]


def _perturbed(model: torch.nn.Module, names: str = "", seed: int = 0) -> None:
    """Move the policy away from the reference, so rewards and the KL estimate are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if names in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _logged(method: KTO, outs: list[Any]) -> dict[str, float]:
    """The metrics the loop logs for a step of these micro-batches on one process."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for out in outs:
        for name, value in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        for name, value in out.metric_counts.items():
            counts[name] = counts.get(name, 0.0) + float(value)
    return method.finish_metrics(step_metric_means(sums, counts, sum(int(out.count) for out in outs)))


def _trl_trainer(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, out: Path) -> Any:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(PARITY_ROWS),
        beta=0.2,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        max_length=None,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    dataset = Dataset.from_list(PARITY_ROWS)
    return KTOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )


@pytest.mark.parametrize(("adapter", "attention"), [("full", "varlen"), ("lora", "sdpa")])
def test_loss_and_every_gradient_match_trl(adapter, attention, tiny_model_dirs, tmp_path):
    """TRL's padded forwards and KTO loss vs one packed row here: same rows, same ids, same model."""
    pytest.importorskip("trl")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.attention import packed_mask_kind
    from tunesmith.models.varlen_attention import NAME, register_varlen_sdpa

    register_varlen_sdpa()
    attention = NAME if attention == "varlen" else attention
    model_dir = tiny_model_dirs["llama"]
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    reference = copy.deepcopy(base).requires_grad_(False)
    if adapter == "lora":
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        _perturbed(ours, "lora_B")
    else:
        ours = copy.deepcopy(base)
        _perturbed(ours)
    theirs = copy.deepcopy(ours)
    theirs.set_attn_implementation("sdpa")  # TRL: right-padded rows with a 2-D mask
    trainer = _trl_trainer(theirs, copy.deepcopy(reference), hf_tokenizer, tmp_path / "trl")
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(len(PARITY_ROWS))]
    their_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    their_loss.backward()

    examples = [
        TokenizedKTO(r["prompt_ids"], r["completion_ids"], r["label"], RowRef("trl", i + 1))
        for i, r in enumerate(rows)
    ]
    batch = collate_kto(examples, hf_tokenizer.pad_token_id, packed_mask_kind(attention), seq_len=1024)
    mismatched = _sequences(batch.tensors)[len(rows) :]
    assert [ids[len(r["prompt_ids"]) :] for (ids, _), r in zip(mismatched, rows, strict=True)] == [
        r["KL_completion_ids"] for r in rows
    ]  # TRL's own KL pairs
    cfg = _cfg(model_dir, tmp_path / "unused.jsonl", tmp_path / "run", adapter)
    cfg["kto"] = {"beta": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    method = KTO()
    method.cfg = load_config(cfg)
    scorer = KTOScorer(ours, chunk_size=16, frozen_reference=None if adapter == "lora" else reference)
    out = method.compute_loss(scorer, batch.tensors)
    our_loss = out.loss_sum / out.count
    our_loss.backward()

    assert abs(our_loss.item() - their_loss.item()) <= PARITY_TOL
    trl_metrics = trainer._metrics["train"]
    assert trl_metrics["kl"][-1] > 0  # the KL estimate is exercised, not clamped away
    means = _logged(method, [out])
    for name in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "rewards/margins",
    ):
        assert means[name] == pytest.approx(trl_metrics[name][-1], abs=PARITY_TOL, rel=PARITY_TOL)
    their_params = dict(trainer.model.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        theirs_grad = their_params[name].grad
        assert param.grad is not None and theirs_grad is not None, name
        scale = theirs_grad.abs().max().item()
        assert scale > 0, name
        assert (param.grad - theirs_grad).abs().max().item() <= PARITY_TOL * scale, name
        compared += 1
    assert compared == sum(p.requires_grad for p in trainer.model.parameters()) > 0


# ---------------------------------------------------------------------------- on the one loop

SEPARABLE = [
    {"prompt": f"Question {i}: is the sky blue?", "completion": answer, "label": label}
    for i in range(8)
    for answer, label in ((f"Yes, it is blue {i}.", True), (f"No idea, maybe green {i}.", False))
]


def _cfg(
    model_dir: Path, data: Path, out: Path, adapter: str = "lora", kto: dict | None = None, **train_overrides
) -> dict:
    cfg = base_config(
        model_dir,
        data,
        out,
        adapter={"type": "full"} if adapter == "full" else {"type": "lora", "r": 8, "alpha": 16},
        train={"batch_size": 4, "lr": 5e-3 if adapter == "lora" else 1e-3, **train_overrides},
    )
    cfg["method"] = "kto"
    if kto:
        cfg["kto"] = kto
    return cfg


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_first_step_has_zero_rewards_and_the_loss_the_formula_gives(adapter, tiny_model_dirs, tmp_path):
    """Policy == reference: r = 0 and z0 = 0, so each example's loss is 0.5 x its class weight."""
    rows = SEPARABLE[:5] + [SEPARABLE[6]]  # 4 desirable, 2 undesirable
    data = _write(tmp_path / "k.jsonl", rows)
    kto = {"desirable_weight": 1.0, "undesirable_weight": 1.5}
    run = tmp_path / "run"
    train(
        load_config(_cfg(tiny_model_dirs["llama"], data, run, adapter, kto, batch_size=6, max_steps=2)),
        show_progress=False,
    )
    first, second = _rows(run)
    n_desirable = sum(r["label"] for r in rows)
    expected = 0.5 * (1.0 * n_desirable + 1.5 * (len(rows) - n_desirable)) / len(rows)
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name
    assert second["loss"] != pytest.approx(expected, abs=1e-6)  # the update moved the policy


def test_a_separable_labelled_set_is_learned(tiny_model_dirs, tmp_path):
    data = _write(tmp_path / "k.jsonl", SEPARABLE)
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dirs["qwen2"], data, run, epochs=2, scheduler="constant")
    train(load_config(cfg), show_progress=False)
    rows = _rows(run)
    assert len(rows) == 8
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], [r["loss"] for r in rows]
    margins = [r["rewards/margins"] for r in rows]
    assert margins[-1] > margins[len(margins) // 2] > margins[0] == pytest.approx(0.0, abs=1e-6)
    for row in rows[-3:]:
        assert row["rewards/chosen"] > 0 > row["rewards/rejected"]
        assert row["rewards/margins"] > 0.3


def test_accumulation_equals_the_bigger_batch_over_all_examples(tiny_model_dirs, tmp_path):
    """A step's loss is the mean over all its examples, however they are split into micro-batches.

    Micro-batches of unequal size (4 + 2) and classes in unequal mix tell a mean over examples from a
    mean of micro-batch means. At the first step policy == reference, so every micro-batch's
    reference point is 0 and the two runs must agree exactly (afterwards each micro-batch has its own
    KL estimate, as in TRL).
    """
    rows = SEPARABLE[:5] + [SEPARABLE[6]]
    data = _write(tmp_path / "k.jsonl", rows)
    model_dir, kto = tiny_model_dirs["mistral"], {"desirable_weight": 1.0, "undesirable_weight": 2.0}
    runs = {}
    for name, shape in {"big": dict(batch_size=6), "acc": dict(batch_size=4, grad_accum=2)}.items():
        cfg = _cfg(model_dir, data, tmp_path / name, kto=kto, max_steps=1, **shape)
        train(load_config(cfg), show_progress=False)
        runs[name] = _rows(tmp_path / name)[0]
    assert runs["big"]["loss"] == pytest.approx(runs["acc"]["loss"], abs=1e-6)
    assert runs["big"]["grad_norm"] == pytest.approx(runs["acc"]["grad_norm"], rel=1e-5)
    for name in CLASS_MEANS:  # class means over the step's examples, not micro-batch means
        assert runs["acc"][name] == pytest.approx(runs["big"][name], abs=1e-6), name
    assert runs["big"]["logps/chosen"] < 0 and runs["big"]["logps/rejected"] < 0


CLASS_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize(
    "labels", [(True, True, True, False, True, False), (True, True, True, True, False, False)]
)
def test_class_means_do_not_depend_on_how_the_examples_are_split(labels, tiny_model_dirs, tmp_path):
    """The metrics of micro-batches of 4 + 2 examples are those of one micro-batch of all 6.

    The policy is moved off the reference, so rewards are not 0. The second split leaves each
    micro-batch one class only: a class mean per micro-batch would count the missing class as 0.
    """
    from transformers import AutoModelForCausalLM

    from tunesmith.models.attention import packed_mask_kind

    model_dir = tiny_model_dirs["llama"]
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    _perturbed(policy)
    examples = [
        _example([1, 30 + i, 31 + i], [40 + i] * (2 + 3 * i % 5), label, i) for i, label in enumerate(labels)
    ]
    method = KTO()
    method.cfg = load_config(_cfg(model_dir, tmp_path / "unused.jsonl", tmp_path / "run", "full"))
    scorer = KTOScorer(policy, 16, reference)
    mask = packed_mask_kind("sdpa")

    def out(part: list[TokenizedKTO]) -> Any:
        return method.compute_loss(scorer, collate_kto(part, 2, mask, seq_len=64).tensors)

    whole = _logged(method, [out(examples)])
    split = _logged(method, [out(examples[:4]), out(examples[4:])])
    for name in CLASS_MEANS:
        assert split[name] == pytest.approx(whole[name], abs=1e-6), name
    assert abs(whole["rewards/chosen"]) > 1e-3 and abs(whole["rewards/rejected"]) > 1e-3


def test_resume_is_exact(tiny_model_dirs, tmp_path):
    data = _write(tmp_path / "k.jsonl", SEPARABLE[:6])
    model_dir = tiny_model_dirs["llama"]
    straight = train(load_config(_cfg(model_dir, data, tmp_path / "a", epochs=2)), show_progress=False)
    first = train(
        load_config(_cfg(model_dir, data, tmp_path / "b", epochs=2)), show_progress=False, stop_after_step=3
    )
    second = train(
        load_config(_cfg(model_dir, data, tmp_path / "b", epochs=2, resume="auto")), show_progress=False
    )
    assert straight.steps == 4  # 6 examples in micro-batches of 4 + 2, over 2 epochs; stopped mid-epoch
    assert first.losses + second.losses == straight.losses
