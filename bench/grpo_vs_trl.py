"""tunesmith's GRPO side by side with TRL's GRPOTrainer: step time and generated tokens per second.

    .venv/bin/python bench/grpo_vs_trl.py --steps 4 --repeats 2
    .venv/bin/python bench/grpo_vs_trl.py --quick        # a smoke run: numbers not meaningful

Both train the default model (SmolLM2-135M-Instruct) with LoRA r=16 on every linear layer, on the
same arithmetic prompts (examples/data/arithmetic_prompts.jsonl) and a reward of 1 for the right
number (tunesmith's built-in exact_match; an equivalent function for TRL), with the same settings: `--prompts` prompts per step, each
with `--generations` sampled completions of at most `--max-new` tokens, temperature 1.0, beta 0
(no reference pass), one update per generation, fp32, no gradient checkpointing, constant lr.
TRL generates with transformers' `generate` (no vLLM), as tunesmith does.

Each run is its own subprocess (peak RSS is the whole process's); runs are interleaved. Reported:
seconds per optimizer step over the training loop, and generated completion tokens per second of
that time (generation + scoring + the update: what a step costs per sampled token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from side_by_side import interleaved, peak_rss_bytes, run_worker, worker_main, write_results  # noqa: E402

TOOLS = ("tunesmith", "trl")
PROMPTS = REPO / "examples" / "data" / "arithmetic_prompts.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tunesmith GRPO vs TRL GRPOTrainer")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new", type=int, default=32, help="max completion tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 steps, 1 repeat, 16 tokens")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tunesmith-bench-grpo"))
    p.add_argument("--results", type=Path, default=BENCH / "results" / "grpo_vs_trl.json")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.max_new = 2, 1, 16
        if args.results == BENCH / "results" / "grpo_vs_trl.json":
            args.results = args.work_dir / "quick.json"
    return args


def number_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion contains the answer as a number (TRL's reward signature)."""
    import re

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(a in re.findall(r"-?\d+", t)) for t, a in zip(texts, answer, strict=True)]


# ----------------------------------------------------------------------------- workers


def run_tunesmith(spec: dict[str, Any]) -> dict[str, Any]:
    import tunesmith

    run_dir = Path(spec["work_dir"]) / "run"
    cfg = {
        "model": "default",
        "method": "grpo",
        "adapter": {"type": "lora", "r": 16, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "data": {"train": [{"path": str(PROMPTS)}], "seq_len": 256, "eval_split": 0.0},
        "grpo": {
            "num_generations": spec["generations"],
            "max_completion_length": spec["max_new"],
            "temperature": 1.0,
            "beta": 0.0,
            "rewards": [{"function": "exact_match", "args": {"column": "answer"}}],
            "log_completions_every": None,
        },
        "train": {
            "max_steps": spec["steps"],
            "batch_size": spec["prompts"],
            "lr": spec["lr"],
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "seed": spec["seed"],
            "precision": "fp32",
            "save_total_limit": 1,
        },
        "output": {"dir": str(run_dir), "overwrite": True},
    }
    tunesmith.train(cfg, show_progress=False)
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    completions = spec["prompts"] * spec["generations"]
    return {
        "steps": len(rows),
        "train_s": rows[-1]["elapsed_s"],
        "completion_tokens": sum(r["completion_length"] * completions for r in rows),
        "rewards": [r.get("reward") for r in rows],
        "peak_rss": peak_rss_bytes(),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.models.default_model import default_model_dir

    model_dir = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])} for r in rows]
    )
    record: dict[str, Any] = {"lengths": [], "rewards": []}

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            record["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            record["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "completions/mean_length" in logs:
                record["lengths"].append(float(logs["completions/mean_length"]))
                record["rewards"].append(logs.get("reward"))

    completions = spec["prompts"] * spec["generations"]
    config = GRPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "out"),
        per_device_train_batch_size=completions,
        num_generations=spec["generations"],
        max_completion_length=spec["max_new"],
        temperature=1.0,
        beta=0.0,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        seed=spec["seed"],
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=number_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timing()],
    )
    trainer.train()
    return {
        "steps": trainer.state.global_step,
        "train_s": record["end"] - record["t0"],
        "completion_tokens": sum(length * completions for length in record["lengths"]),
        "rewards": record["rewards"],
        "peak_rss": peak_rss_bytes(),
    }


# ----------------------------------------------------------------------------- driver


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, results in runs.items():
        out[tool] = {
            "step_s": statistics.median(r["train_s"] / r["steps"] for r in results),
            "completion_tokens_per_s": statistics.median(
                r["completion_tokens"] / r["train_s"] for r in results
            ),
            "peak_rss_gb": statistics.median(r["peak_rss"] / 1e9 for r in results),
            "steps": results[0]["steps"],
        }
    ours, theirs = out["tunesmith"], out["trl"]
    out["ratios"] = {
        "step_time": ours["step_s"] / theirs["step_s"],
        "completion_tokens_per_s": ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"],
        "peak_rss": ours["peak_rss_gb"] / theirs["peak_rss_gb"],
    }
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| tool | steps | s per step | completion tokens/s | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for tool, label in (("tunesmith", "tunesmith `method: grpo`"), ("trl", "TRL GRPOTrainer")):
        r = summary[tool]
        lines.append(
            f"| {label} | {r['steps']} | {r['step_s']:.1f} | {r['completion_tokens_per_s']:.1f} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    ratios = summary["ratios"]
    lines.append("")
    lines.append(
        f"tunesmith / TRL: step time {ratios['step_time']:.2f}x, completion tokens/s "
        f"{ratios['completion_tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, {"tunesmith": run_tunesmith, "trl": run_trl})
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    keys = ("steps", "prompts", "generations", "max_new", "lr", "seed")
    spec = {k: getattr(args, k) for k in keys}

    def run(tool: str, repeat: int) -> dict[str, Any]:
        return run_worker(__file__, args.work_dir / f"{tool}-{repeat}", {"tool": tool, **spec})

    runs = interleaved(TOOLS, args.repeats, run, lambda r: f"{r['train_s'] / r['steps']:.1f} s/step")
    summary = summarize(runs)
    write_results(args, runs, summary, markdown(summary))


if __name__ == "__main__":
    main()
