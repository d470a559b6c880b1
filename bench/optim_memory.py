"""Peak memory and loss of full fine-tuning of the default model, one optimizer per process.

Each optimizer trains the same steps on the same packed rows in a fresh child process, which
reports its whole-process peak RSS (getrusage ru_maxrss: what `/usr/bin/time -v` prints as
"Maximum resident set size"), the bytes of optimizer state, and the loss of each step.

    python bench/optim_memory.py --steps 8 --seq-len 512 --out bench/results/optim_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adamw_8bit": {},
    "adafactor": {},
    "galore": {},
    "apollo": {},
    "apollo_mini": {"name": "apollo", "apollo": {"rank": 1, "scale_type": "tensor", "scale": 128}},
    "adam_mini": {},
    "badam": {},
}


def _child(name: str, data: Path, out: Path, steps: int, seq_len: int, lr: float) -> dict[str, Any]:
    from tunesmith.config.load import load_config
    from tunesmith.training import checkpoint, loop

    optim = {"name": name, **ROWS[name]}
    cfg = load_config(
        {
            "model": "default",
            "adapter": {"type": "full"},
            "data": {"train": [{"path": str(data)}], "seq_len": seq_len, "packing": True},
            "train": {
                "max_steps": steps,
                "batch_size": 1,
                "lr": lr,
                "warmup_ratio": 0.0,
                "scheduler": "constant",
                "precision": "fp32",
                "seed": 0,
            },
            "optim": optim,
            "output": {"dir": str(out)},
        }
    )
    seen: dict[str, Any] = {}

    class Measured(loop.Trainer):
        def __init__(self, cfg, accelerator, *args, **kwargs):
            super().__init__(cfg, accelerator, *args, **kwargs)
            seen["trainer"] = self

    loop.Trainer = Measured
    started = time.perf_counter()
    result = loop.train(cfg, show_progress=False)
    wall = time.perf_counter() - started
    optimizer = seen["trainer"].optimizer
    return {
        "optimizer": name,
        "optim": optim,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "optimizer_state_bytes": checkpoint._optimizer_bytes(optimizer.optimizer),
        "losses": result.losses,
        "final_loss": result.losses[-1],
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/optim_memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        report = _child(args.child, args.data, args.run_dir, args.steps, args.seq_len, args.lr)
        print("RESULT " + json.dumps(report))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from make_data import make_dataset, write_jsonl

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_jsonl(make_dataset(args.rows, seed=0), data)
        for name in args.only:
            command = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--data",
                str(data),
                "--run-dir",
                f"{tmp}/{name}",
            ]
            command += ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--lr", str(args.lr)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                results.append({"optimizer": name, "error": done.stderr[-2000:]})
            else:
                results.append(json.loads(lines[-1][len("RESULT ") :]))
            row = results[-1]
            shown = {
                k: row.get(k) for k in ("peak_rss_bytes", "optimizer_state_bytes", "final_loss", "wall_s")
            }
            print(name, shown if "error" not in row else row["error"][-400:], flush=True)
            _write(args, results)  # after each row: a stopped run keeps what it measured


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    cpu = _cpu_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "workload": {
            "model": "default (SmolLM2-135M, fp32)",
            "adapter": "full",
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch_size": 1,
            "packing": True,
            "lr": args.lr,
            "rows": args.rows,
        },
        "cpu": cpu,
        "python": platform.python_version(),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
