"""Several sources in one config: formats, template overrides, weights/counts, dedup, seeds, report."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.config.load import ConfigError, load_config
from tunesmith.config.schema import DataConfig
from tunesmith.data.build import build_data
from tunesmith.data.errors import DataError
from tunesmith.data.mixture import choose, plan_counts


def _messages_file(path: Path, rows: int, tag: str) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            messages = [
                {"role": "user", "content": f"{tag} question {i}?"},
                {"role": "assistant", "content": f"{tag} answer {i}."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def _alpaca_file(path: Path, rows: int, tag: str) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"instruction": f"{tag} task {i}", "output": f"{tag} done {i}."}) + "\n")
    return path


def _build(tokenizer, train, **options):
    return build_data(DataConfig(train=train, seq_len=256, **options), tokenizer, "sft")


def _tags(tokenizer, samples) -> Counter[str]:
    """How many samples came from each source (the tag is the first word of the reply)."""
    return Counter(tokenizer.decode([t for t in s.labels if t != -100]).split()[0] for s in samples)


def test_sources_with_their_own_format_and_template(tokenizer, tmp_path):
    chat = _messages_file(tmp_path / "chat.jsonl", 3, "chat")
    tasks = _alpaca_file(tmp_path / "tasks.jsonl", 2, "alpaca")
    built = _build(
        tokenizer,
        [
            {"path": str(chat), "format": "messages"},
            {"path": str(tasks), "format": "alpaca", "template": "llama3"},
        ],
        shuffle=False,
    )
    texts = [tokenizer.decode(s.input_ids) for s in built.train]
    assert all("SmolLM" in t for t in texts[:3])  # the tokenizer's template adds its system prompt
    assert all("<|start_header_id|>" in t and "SmolLM" not in t for t in texts[3:])
    assert [(s.label, s.rows_read, s.used) for s in built.report.sources] == [
        ("data.train[0]", 3, 3),
        ("data.train[1]", 2, 2),
    ]


def test_samples_subsamples_and_repeats_exactly(tokenizer, tmp_path):
    big = _messages_file(tmp_path / "big.jsonl", 10, "big")
    small = _messages_file(tmp_path / "small.jsonl", 3, "small")
    built = _build(tokenizer, [{"path": str(big), "samples": 4}, {"path": str(small), "samples": 7}])
    assert _tags(tokenizer, built.train) == {"big": 4, "small": 7}
    small_rows = Counter(str(s.source) for s in built.train if "small" in s.source.file)
    assert sorted(small_rows.values()) == [2, 2, 3]  # two full repeats plus one more
    assert len({str(s.source) for s in built.train if "big" in s.source.file}) == 4  # no repeats
    report = built.report.sources
    assert (report[0].available, report[0].used, report[1].available, report[1].used) == (10, 4, 3, 7)


def test_weights_share_the_weighted_sources_combined_size(tokenizer, tmp_path):
    a = _messages_file(tmp_path / "a.jsonl", 2, "aaa")
    b = _messages_file(tmp_path / "b.jsonl", 6, "bbb")
    c = _messages_file(tmp_path / "c.jsonl", 3, "ccc")
    built = _build(
        tokenizer, [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}, {"path": str(c)}]
    )
    assert _tags(tokenizer, built.train) == {"aaa": 4, "bbb": 4, "ccc": 3}


def test_plan_counts_and_choose():
    assert plan_counts([100, 900], [1, 1], [None, None]) == [500, 500]
    assert plan_counts([100, 900, 50], [3, 1, None], [None, None, None]) == [750, 250, 50]
    assert plan_counts([10, 10], [None, None], [5, 25]) == [5, 25]
    assert plan_counts([0, 10], [1, 1], [None, None]) == [0, 5]  # an empty source cannot repeat
    assert sum(plan_counts([7, 7, 7], [1, 1, 1], [None] * 3)) == 21
    assert choose(3, 7, random.Random(0))[:6] == [0, 1, 2, 0, 1, 2]
    assert choose(5, 0, random.Random(0)) == []


def test_subsets_and_order_follow_data_seed(tokenizer, tmp_path):
    data = _messages_file(tmp_path / "d.jsonl", 12, "d")

    def order(seed: int) -> list[str]:
        built = _build(tokenizer, [{"path": str(data), "samples": 6}], seed=seed)
        return [str(s.source) for s in built.train]

    assert order(1) == order(1)
    assert order(1) != order(2)
    unshuffled = _build(tokenizer, [{"path": str(data)}], shuffle=False).train
    assert [s.source.line for s in unshuffled] == list(range(1, 13))


def test_dedup_drops_exact_duplicates_and_counts_them(tokenizer, tmp_path):
    a = _messages_file(tmp_path / "a.jsonl", 4, "same")
    b = _messages_file(tmp_path / "b.jsonl", 3, "same")  # the first three rows of a again
    kept = _build(tokenizer, [{"path": str(a)}, {"path": str(b)}], dedup=True)
    assert kept.report.train_samples == 4 and kept.report.duplicates == 3
    assert [s.duplicates for s in kept.report.sources] == [0, 3]
    assert "3 duplicates removed" in kept.report.summary()
    every = _build(tokenizer, [{"path": str(a)}, {"path": str(b)}])
    assert every.report.train_samples == 7 and every.report.duplicates == 0


def test_eval_split_is_taken_before_the_mixture_repeats(tokenizer, tmp_path):
    data = _messages_file(tmp_path / "d.jsonl", 10, "d")
    built = _build(tokenizer, [{"path": str(data), "samples": 30}], eval_split=0.2)
    held = {str(s.source) for s in built.eval}
    assert len(held) == 2 and not held & {str(s.source) for s in built.train}
    assert len(built.train) == 30
    assert built.report.sources[0].held_out == 2


def test_eval_sources_are_counted_per_source(tokenizer, tmp_path):
    train = _messages_file(tmp_path / "t.jsonl", 4, "t")
    held = _messages_file(tmp_path / "e.jsonl", 2, "e")
    built = build_data(
        DataConfig(train=[{"path": str(train)}], eval=[{"path": str(held)}], seq_len=256), tokenizer, "sft"
    )
    assert [(s.label, s.used) for s in built.report.sources] == [("data.train[0]", 4), ("data.eval[0]", 2)]


def test_config_rejects_weight_with_samples_and_eval_weights():
    base = {"data": {"train": [{"path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"data.train.0.samples: .*cannot be combined with weight"):
        load_config(base, ["data.train=[{path: a.jsonl, weight: 1, samples: 3}]"])
    with pytest.raises(ConfigError, match=r"data.eval: .*training sources only"):
        load_config(base, ["data.eval=[{path: a.jsonl, samples: 3}]"])
    with pytest.raises(ConfigError, match=r"data.mask_history: .*train_on_prompt"):
        load_config(base, ["data.mask_history=true", "data.train_on_prompt=true"])
    with pytest.raises(ConfigError, match=r"data.train.0.weight: expected a positive number"):
        load_config(base, ["data.train=[{path: a.jsonl, weight: 0}]"])


def test_a_bad_template_override_names_the_source(tokenizer, tmp_path):
    data = _messages_file(tmp_path / "d.jsonl", 2, "d")
    with pytest.raises(DataError, match=r"data.train\[0\].template: unknown chat template 'chatmll'"):
        _build(tokenizer, [{"path": str(data), "template": "chatmll"}])


def test_template_failures_follow_on_error(tokenizer, tmp_path):
    rows = tmp_path / "tools.jsonl"
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    tool_row = [
        {"role": "user", "content": "Call f."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done."},
    ]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rows.write_text("\n".join(json.dumps({"messages": m}) for m in (plain, tool_row, plain)) + "\n")
    source = [{"path": str(rows), "template": "qwen2"}]
    with pytest.raises(DataError, match=r"tools.jsonl:2: chat template: .*tool calls"):
        _build(tokenizer, source)
    skipped = _build(tokenizer, source, on_error="skip")
    assert skipped.report.train_samples == 2
    assert [i.ref.line for i in skipped.report.skipped] == [2]


def test_text_rows_need_method_pretrain(tokenizer, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "Just some prose."}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: a raw-text row needs method: pretrain"):
        _build(tokenizer, [{"path": str(text)}])
    built = build_data(DataConfig(train=[{"path": str(text)}], seq_len=64), tokenizer, "pretrain")
    assert built.train[0].labels == built.train[0].input_ids
