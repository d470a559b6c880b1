"""A multi-GB JSON Lines file streams with bounded memory (slow: writes about 2 GB)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import base_config

pytestmark = pytest.mark.slow
GIGABYTES = 2


def _write_big_jsonl(path, gigabytes):
    filler = " ".join(f"word{i % 97}" for i in range(300))  # about 2 KB per row
    target = gigabytes * 1024**3
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        i = 0
        while written < target:
            row = (
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Row {i}. {filler}"},
                            {"role": "assistant", "content": f"Answer {i}."},
                        ]
                    }
                )
                + "\n"
            )
            handle.write(row)
            written += len(row)
            i += 1
    return written


def _train_and_measure(tiny_model_dir, data, run, config_path):
    cfg = base_config(
        tiny_model_dir,
        data,
        run,
        data={
            "train": [{"path": str(data)}],
            "seq_len": 1024,
            "packing": True,
            "streaming": True,
            "stream_block_rows": 512,
        },
        train={"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_every": 3},
    )
    config_path.write_text(yaml.safe_dump(cfg))
    # The child reports its own peak RSS: RUSAGE_CHILDREN would include earlier tests' processes.
    probe = (
        "import resource, sys; from tunesmith.cli.main import main; rc = main(sys.argv[1:]); "
        "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "train", str(config_path)], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("PEAK_RSS_KIB")[-1].split()[0]) * 1024


def test_multi_gigabyte_file_trains_with_bounded_memory(tiny_model_dirs, tmp_path):
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    _write_big_jsonl(small, 0.01)
    size = _write_big_jsonl(big, GIGABYTES)
    small_peak = _train_and_measure(
        tiny_model_dirs["llama"], small, tmp_path / "small-run", tmp_path / "s.yaml"
    )
    run = tmp_path / "run"
    big_peak = _train_and_measure(tiny_model_dirs["llama"], big, run, tmp_path / "b.yaml")
    # Memory must not grow with the file: the same training on a 10 MB file is the yardstick.
    assert big_peak < small_peak + 256 * 1024**2, (
        f"peak RSS {big_peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB file vs {small_peak / 1e9:.2f} GB for 10 MB"
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    state = json.loads(sorted((run / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["data"]["rows"]["offset"] < size / 100  # six steps used only the first blocks of the file
