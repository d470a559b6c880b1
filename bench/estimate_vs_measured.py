"""Measured whole-process peak RSS of `tunesmith train` beside `tunesmith estimate`'s prediction.

One row per optimizer (full fine-tuning) and per adapter (LoRA, DoRA, QLoRA 4-bit) on the default
model. Each row runs `/usr/bin/time -v tunesmith train ROW.yaml` in its own process (one at a time:
a second heavy process would change both), reads "Maximum resident set size" and the losses from
metrics.jsonl, then asks `tunesmith.training.estimate` for the same config's `peak_bytes`.

    python bench/estimate_vs_measured.py --steps 3 --seq-len 256 --batch 1
    python bench/estimate_vs_measured.py --estimate-only   # recompute the estimate column only
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

FULL = {"type": "full"}
LORA = {"type": "lora", "r": 16, "alpha": 16}
ROWS: dict[str, dict[str, Any]] = {
    "full adamw": {"adapter": FULL, "optim": {"name": "adamw"}},
    "full adamw_8bit": {"adapter": FULL, "optim": {"name": "adamw_8bit"}},
    "full adafactor": {"adapter": FULL, "optim": {"name": "adafactor"}},
    "full galore": {"adapter": FULL, "optim": {"name": "galore"}},
    "full apollo": {"adapter": FULL, "optim": {"name": "apollo"}},
    "full adam_mini": {"adapter": FULL, "optim": {"name": "adam_mini"}},
    "full badam": {"adapter": FULL, "optim": {"name": "badam"}},
    "lora": {"adapter": LORA, "optim": {"name": "adamw"}, "lr": 2e-4},
    "dora": {"adapter": {**LORA, "dora": True}, "optim": {"name": "adamw"}, "lr": 2e-4},
    "qlora 4-bit": {"adapter": {**LORA, "type": "qlora", "bits": 4}, "optim": {"name": "adamw"}, "lr": 2e-4},
}
EXTRA_ROWS: dict[str, dict[str, Any]] = {
    "lora seq 1024 batch 2": {
        "adapter": LORA,
        "optim": {"name": "adamw"},
        "lr": 2e-4,
        "seq_len": 1024,
        "batch": 2,
    },
    "full adamw, checkpointing, seq 1024": {
        "adapter": FULL,
        "optim": {"name": "adamw"},
        "seq_len": 1024,
        "checkpointing": True,
    },
}
HELD_OUT_ROWS: dict[str, dict[str, Any]] = {  # measured after the constants were fitted
    "lora seq 1024 batch 1": {"adapter": LORA, "optim": {"name": "adamw"}, "lr": 2e-4, "seq_len": 1024},
    "full adamw_8bit seq 512 batch 2": {
        "adapter": FULL,
        "optim": {"name": "adamw_8bit"},
        "seq_len": 512,
        "batch": 2,
    },
    "full adafactor seq 512 batch 2": {
        "adapter": FULL,
        "optim": {"name": "adafactor"},
        "seq_len": 512,
        "batch": 2,
    },
}
ALL_ROWS = {**ROWS, **EXTRA_ROWS, **HELD_OUT_ROWS}


def row_config(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    row = ALL_ROWS[name]
    return {
        "model": "default",
        "adapter": row["adapter"],
        "data": {
            "train": [{"path": str(data)}],
            "seq_len": row.get("seq_len", args.seq_len),
            "packing": True,
        },
        "train": {
            "max_steps": args.steps,
            "batch_size": row.get("batch", args.batch),
            "lr": row.get("lr", 2e-5),
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "precision": "fp32",
            "seed": 0,
            "gradient_checkpointing": row.get("checkpointing", False),
        },
        "optim": row["optim"],
        "output": {"dir": str(out), "overwrite": True},
    }


def measure(config_path: Path, run_dir: Path) -> dict[str, Any]:
    tunesmith = Path(sys.executable).with_name("tunesmith")
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", str(tunesmith), "train", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode or not found:
        return {"error": (done.stdout + done.stderr)[-2000:]}
    losses = []
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record and "eval_loss" not in record:
            losses.append(record["loss"])
    return {"peak_rss_bytes": int(found.group(1)) * 1024, "losses": losses, "wall_s": round(wall, 1)}


def estimate_of(config: dict[str, Any]) -> dict[str, Any]:
    from tunesmith.config.load import load_config
    from tunesmith.training.estimate import estimate

    result = estimate(load_config(config), calibrate=False)
    return {"estimate_peak_bytes": result.peak_bytes, "estimate_parts": result.parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ALL_ROWS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/estimate_vs_measured.json"))
    parser.add_argument(
        "--estimate-only", action="store_true", help="keep the measurements, redo the estimates"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from make_data import make_dataset, write_jsonl

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"results": []}
    by_name = {row["row"]: row for row in previous["results"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_jsonl(make_dataset(args.rows, seed=0), data)
        for name in args.only:
            run_dir = Path(tmp) / re.sub(r"\W+", "_", name)
            config = row_config(name, data, run_dir, args)
            row = dict(by_name.get(name, {}))
            if not args.estimate_only or "peak_rss_bytes" not in row:
                config_path = Path(tmp) / f"{run_dir.name}.yaml"
                config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
                row = {
                    "row": name,
                    "config": {k: config[k] for k in ("adapter", "optim")},
                    **measure(config_path, run_dir),
                }
                row["workload"] = {
                    "seq_len": config["data"]["seq_len"],
                    "batch": config["train"]["batch_size"],
                }
            if "peak_rss_bytes" in row:
                try:
                    row.update(estimate_of(config))
                except ImportError as exc:  # measuring before the estimate exists
                    print(f"no estimate: {exc}", flush=True)
                    by_name[name] = row
                    _write(args, list(by_name.values()))
                    continue
                row["error_pct"] = round(100 * (row["estimate_peak_bytes"] / row["peak_rss_bytes"] - 1), 1)
            by_name[name] = row
            print(
                name,
                {
                    k: row.get(k)
                    for k in ("peak_rss_bytes", "estimate_peak_bytes", "error_pct", "wall_s", "error")
                },
                flush=True,
            )
            _write(args, list(by_name.values()))


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "workload": {
            "model": "default (SmolLM2-135M, fp32)",
            "steps": args.steps,
            "rows": args.rows,
            "packing": True,
        },
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
