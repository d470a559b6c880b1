"""`data.on_error: skip` trains on exactly the good rows, and raise stops at the first bad one."""

from __future__ import annotations

import json

import pytest

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.data.errors import DataError
from tunesmith.training.loop import train

BAD_ROWS = [
    '{"messages": [{"role": "user", "content": "hi"}]}',  # no assistant turn
    '{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
    '{"messages": [{"role": "user", "content": "cut off"',  # truncated JSON
    '["not", "an", "object"]',
    '{"instruction": 5, "output": "x"}',
]


def _mixed_file(path):
    good_lines, lines = [], []
    for i in range(12):
        if i % 3 == 1:
            lines.append(BAD_ROWS[i // 3 % len(BAD_ROWS)])
        else:
            messages = [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
            lines.append(json.dumps({"messages": messages}))
            good_lines.append(len(lines))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return good_lines


def test_skip_trains_on_exactly_the_good_rows(tiny_model_dirs, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good_lines = _mixed_file(data)
    cfg = base_config(
        tiny_model_dirs["llama"], data, tmp_path / "run", train={"epochs": 1, "batch_size": 1, "lr": 1e-3}
    )
    cfg["data"].update(on_error="skip", packing=False, shuffle=False, cache=False)
    result = train(load_config(cfg), show_progress=False)
    assert len(result.losses) == len(good_lines)

    from tunesmith.data.build import build_data
    from tunesmith.models.load import load_tokenizer

    built = build_data(load_config(cfg).data, load_tokenizer(tiny_model_dirs["llama"]), "sft")
    assert sorted(s.source.line for s in built.train) == good_lines
    assert sorted(i.ref.line for i in built.report.skipped) == [2, 5, 8, 11]

    cfg["data"]["on_error"] = "raise"
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: "):
        train(load_config({**cfg, "output": {"dir": str(tmp_path / "run2")}}), show_progress=False)
