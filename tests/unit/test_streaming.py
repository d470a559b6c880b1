"""Streaming from JSON Lines: bounded by one block, and resume continues at the right sample."""

from __future__ import annotations

import json

import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.loop import train


def _write_rows(path, count, start=0):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(start, start + count):
            messages = [
                {"role": "user", "content": f"Row {i}: add {i} and {i}."},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def _config(model_dir, data, out, **train):
    settings = {
        "max_steps": 9,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 5e-3,
        "warmup_ratio": 0.0,
        "seed": 2,
        "max_grad_norm": 1.0,
        **train,
    }
    return load_config(
        base_config(
            model_dir,
            data,
            out,
            data={
                "train": [{"path": str(data)}],
                "seq_len": 64,
                "packing": True,
                "streaming": True,
                "stream_block_rows": 7,
            },
            train=settings,
        )
    )


def test_streaming_resume_matches_straight_run(tiny_model_dirs, tmp_path):
    data = _write_rows(tmp_path / "stream.jsonl", 40)
    model_dir = tiny_model_dirs["llama"]
    straight = train(_config(model_dir, data, tmp_path / "a"), show_progress=False)
    assert len(straight.losses) == 9
    first = train(_config(model_dir, data, tmp_path / "b"), show_progress=False, stop_after_step=4)
    second = train(_config(model_dir, data, tmp_path / "b", resume="auto"), show_progress=False)
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(straight.losses), rtol=0, atol=1e-6
    )


def test_streaming_reads_each_row_once_per_pass(tmp_path):
    from tunesmith.data.batch_tokenize import TokenizeResult
    from tunesmith.data.block import TokenBlock
    from tunesmith.data.streaming import StreamingRows
    from tunesmith.data.tokenize import TokenizedSample

    data = _write_rows(tmp_path / "s.jsonl", 23)

    def tokenize(samples, file_index):
        tokenized = [TokenizedSample([1, 2, 3], [1, 2, 3], s.source) for s in samples]
        return TokenizeResult(TokenBlock.from_samples(tokenized))

    rows = StreamingRows(
        [(data, "auto")], tokenize, seq_len=7, packing=True, block_rows=5, seed=0, on_error="raise"
    )
    seen = []
    for _ in range(14):  # blocks of 5 samples (3 tokens) pack into 3 rows of 7; the last block of 3 into 2
        seen.extend(s.source.line for s in rows.next_row())
    assert sorted(seen) == list(range(1, 24))
    state = rows.state_dict()
    following = [s.source.line for s in rows.next_row()]
    again = StreamingRows(
        [(data, "auto")], tokenize, seq_len=7, packing=True, block_rows=5, seed=0, on_error="raise"
    )
    again.load_state_dict(state)
    assert [s.source.line for s in again.next_row()] == following
