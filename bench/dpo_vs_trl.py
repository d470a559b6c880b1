"""tunesmith's DPO side by side with TRL's DPOTrainer, in one invocation.

    .venv/bin/python bench/dpo_vs_trl.py --pairs 32 --batch 4 --repeats 3
    .venv/bin/python bench/dpo_vs_trl.py --quick        # a smoke run: numbers not meaningful

Both train the default model (SmolLM2-135M-Instruct) with LoRA r=16 on every linear layer, on the
same preference pairs (conversational: a user prompt, a chosen and a rejected assistant answer,
rendered by the model's chat template), for one epoch, with the same settings: DPO sigmoid loss,
beta 0.1, AdamW, constant lr, grad-norm clip 1.0, fp32, no gradient checkpointing, the same pairs
per optimizer step. TRL runs with its defaults otherwise (padded chosen/rejected batches, the
reference pass with the adapter disabled, as tunesmith does).

Each run is its own subprocess, so peak RSS is the whole process's; runs are interleaved
(tunesmith, TRL, tunesmith, TRL, ...) because the machine is shared and noisy, and the table gives
medians and ratios. Real tokens are prompt + answer tokens of both answers of each pair (padding
excluded); tokens/s is over the training loop only (model loading and tokenization excluded for both).
"""

from __future__ import annotations

import argparse
import json
import random
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

SENTENCE = (
    "the model answers every question about rivers mountains cities history numbers music food "
    "weather science language travel with short clear facts and when it does not know it says so "
    "instead of guessing which users prefer over long vague replies full of filler words"
)
WORDS = SENTENCE.split(" ")


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Pairs of varied lengths: prompts of 8-60 words, answers of 10-160 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"prompt": text(8, 60), "chosen": text(10, 160), "rejected": text(10, 160)} for _ in range(n)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tunesmith DPO vs TRL DPOTrainer")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8 pairs, 1 repeat")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tunesmith-bench-dpo"))
    p.add_argument("--results", type=Path, default=BENCH / "results" / "dpo_vs_trl.json")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats = 8, 1
        if args.results == BENCH / "results" / "dpo_vs_trl.json":
            args.results = args.work_dir / "quick.json"
    return args


# ----------------------------------------------------------------------------- workers


def run_tunesmith(spec: dict[str, Any]) -> dict[str, Any]:
    import tunesmith

    run_dir = Path(spec["work_dir"]) / "run"
    cfg = {
        "model": "default",
        "method": "dpo",
        "adapter": {"type": "lora", "r": 16, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "data": {"train": [{"path": spec["pairs_jsonl"]}], "seq_len": spec["seq_len"], "eval_split": 0.0},
        "dpo": {"beta": spec["beta"], "loss_type": "sigmoid"},
        "train": {
            "epochs": 1,
            "batch_size": spec["batch"],
            "lr": spec["lr"],
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
            "seed": spec["seed"],
            "log_every": 1,
            "precision": "fp32",
            "save_total_limit": 1,
        },
        "output": {"dir": str(run_dir), "overwrite": True},
    }
    tunesmith.train(cfg, show_progress=False)
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {
        "steps": len(rows),
        "tokens": rows[-1]["tokens"],
        "train_s": rows[-1]["elapsed_s"],
        "losses": [r["loss"] for r in rows],
        "accuracies": [r.get("rewards/accuracies") for r in rows],
        "peak_rss": peak_rss_bytes(),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models.default_model import default_model_dir

    model_dir = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(spec["pairs_jsonl"]).read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    record: dict[str, Any] = {"tokens": 0, "losses": [], "accuracies": []}

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            record["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            record["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))
                record["accuracies"].append(logs.get("rewards/accuracies"))

    config = DPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "out"),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=spec["seq_len"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timing()],
    )
    collate = trainer.data_collator

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        record["tokens"] += int(batch["attention_mask"].sum())  # real tokens of both answers, no padding
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return {
        "steps": trainer.state.global_step,
        "tokens": record["tokens"],
        "train_s": record["end"] - record["t0"],
        "losses": record["losses"],
        "accuracies": record["accuracies"],
        "peak_rss": peak_rss_bytes(),
    }


# ----------------------------------------------------------------------------- driver


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, results in runs.items():
        tps = [r["tokens"] / r["train_s"] for r in results]
        out[tool] = {
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_all": [round(v, 1) for v in tps],
            "peak_rss_gb": statistics.median(r["peak_rss"] / 1e9 for r in results),
            "steps": results[0]["steps"],
            "tokens": results[0]["tokens"],
            "first_loss": results[0]["losses"][0],
            "last_loss": results[0]["losses"][-1],
        }
    ours, theirs = out["tunesmith"], out["trl"]
    out["ratios"] = {
        "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "peak_rss": ours["peak_rss_gb"] / theirs["peak_rss_gb"],
    }
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| tool | steps | real tokens | real tokens/s: median (each repeat) | peak RSS (GB) | loss: first, last |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool, label in (("tunesmith", "tunesmith `method: dpo`"), ("trl", "TRL DPOTrainer")):
        r = summary[tool]
        every = ", ".join(f"{v:.0f}" for v in r["tokens_per_s_all"])
        lines.append(
            f"| {label} | {r['steps']} | {r['tokens']} | {r['tokens_per_s']:.1f} ({every}) "
            f"| {r['peak_rss_gb']:.2f} | {r['first_loss']:.4f}, {r['last_loss']:.4f} |"
        )
    ratios = summary["ratios"]
    lines.append("")
    lines.append(
        f"tunesmith / TRL: tokens/s {ratios['tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, {"tunesmith": run_tunesmith, "trl": run_trl})
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    pairs_jsonl = args.work_dir / "pairs.jsonl"
    pairs_jsonl.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(args.pairs, args.seed)))
    keys = ("batch", "seq_len", "lr", "beta", "seed")
    spec = {"pairs_jsonl": str(pairs_jsonl), **{k: getattr(args, k) for k in keys}}

    def run(tool: str, repeat: int) -> dict[str, Any]:
        return run_worker(__file__, args.work_dir / f"{tool}-{repeat}", {"tool": tool, **spec})

    runs = interleaved(TOOLS, args.repeats, run, lambda r: f"{r['tokens'] / r['train_s']:.1f} tok/s")
    summary = summarize(runs)
    write_results(args, runs, summary, markdown(summary))


if __name__ == "__main__":
    main()
