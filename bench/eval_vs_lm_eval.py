"""tunesmith's multiple-choice evaluation side by side with lm-evaluation-harness's HF backend.

    .venv/bin/python bench/eval_vs_lm_eval.py --shots 5 --repeats 3
    .venv/bin/python bench/eval_vs_lm_eval.py --model /path/to/hf-dir --task my_task.jsonl

Both score the same task (default: examples/eval/mc_science.jsonl, MMLU format, per-subject first-k
shots) on the same model (default: the embedded SmolLM2-135M-Instruct in fp32), in one process:
tunesmith through `evaluate_mc`, lm-eval through `simple_evaluate` with an `HFLM` built once from
the model's safetensors directory (its defaults otherwise: logits cache on, so questions whose
choices are one token each take one forward, as in tunesmith; right-padded batches of
`--harness-batch` requests). The task is given to lm-eval as one local YAML per subject (the MMLU
template pointed at JSONL files). Timed: prompt building, tokenization and scoring of every item,
for both; model loading excluded for both. Runs alternate (tunesmith, lm-eval, ...) because the
machine is shared; the table gives medians and the ratio, and checks that both scored the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from side_by_side import interleaved, write_results  # noqa: E402

TOOLS = ("tunesmith", "lm_eval")

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {about}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tunesmith evaluate_mc vs lm-eval's HF backend")
    p.add_argument("--model", default="default", help="'default' or a Hugging Face model directory")
    p.add_argument("--task", type=Path, default=REPO / "examples" / "eval" / "mc_science.jsonl")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--harness-batch", type=int, default=8, help="lm-eval's batch_size")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tunesmith's packed row length")
    p.add_argument("--results", type=Path, default=BENCH / "results" / "eval_mc.json")
    return p.parse_args(argv)


def harness_tasks(task_path: Path, folder: Path) -> list[str]:
    """The task as lm-eval YAMLs, one per subject, from tunesmith's own loader (same rows, same order)."""
    from tunesmith.eval.mc import load_items

    items = load_items(task_path)
    names = []
    for subject in dict.fromkeys(i.subject for i in items):
        for split in ("test", "dev"):
            rows = [i for i in items if i.subject == subject and (i.split == "dev") == (split == "dev")]
            with open(folder / f"{subject}_{split}.jsonl", "w", encoding="utf-8") as handle:
                for i in rows:
                    handle.write(
                        json.dumps({"question": i.question, "choices": i.choices, "answer": i.answer}) + "\n"
                    )
        name = f"bench_{subject}"
        (folder / f"{name}.yaml").write_text(
            YAML.format(
                name=name,
                test=folder / f"{subject}_test.jsonl",
                dev=folder / f"{subject}_dev.jsonl",
                about=str(subject).replace("_", " "),
            ),
            encoding="utf-8",
        )
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    import torch

    torch.set_flush_denormal(True)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tunesmith.config.schema import EvalTask
    from tunesmith.eval.mc import evaluate_mc
    from tunesmith.models.load import load_model_and_tokenizer

    model, tokenizer, model_dir = load_model_and_tokenizer(args.model)
    model.eval()
    harness_lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=args.harness_batch, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    names = harness_tasks(args.task, folder)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    task = EvalTask(kind="mc", path=str(args.task), shots=args.shots)
    scores: dict[str, list[float]] = {}

    def run(tool: str, repeat: int) -> dict[str, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        if tool == "tunesmith":
            result = evaluate_mc(model, tokenizer, task, log_samples=True, batch_tokens=args.batch_tokens)
            n = result.n
            scores[tool] = [ll for s in result.samples or [] for ll in s["loglikelihoods"]]
            acc = result.metrics["acc"]
        else:
            out = lm_eval.simple_evaluate(
                model=harness_lm, tasks=names, num_fewshot=args.shots, task_manager=manager, log_samples=True
            )
            n = sum(len(out["samples"][name]) for name in names)
            lls = []
            for name in names:
                for sample in sorted(out["samples"][name], key=lambda s: s["doc_id"]):
                    lls.extend(float(r[0][0]) for r in sample["resps"])
            scores[tool] = lls
            acc = sum(out["results"][name]["acc,none"] * len(out["samples"][name]) for name in names) / n
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "items": n,
            "items_per_s": n / seconds,
            "items_per_cpu_s": n / cpu_seconds,
            "acc": acc,
        }

    runs = interleaved(
        TOOLS,
        args.repeats,
        run,
        lambda r: f"{r['items_per_s']:.2f} items/s ({r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU-s)",
    )
    # Compare item by item in the same order: tunesmith's are in file order, lm-eval's by subject.
    from tunesmith.eval.mc import split_items

    test, _ = split_items(task)
    order = sorted(range(len(test)), key=lambda i: (names.index(f"bench_{test[i].subject}"), i))
    starts = [sum(len(t.choices) for t in test[:i]) for i in range(len(test))]
    ours = [scores["tunesmith"][starts[i] + k] for i in order for k in range(len(test[i].choices))]
    worst = max(abs(a - b) for a, b in zip(ours, scores["lm_eval"], strict=True))
    median = {tool: statistics.median(r["items_per_s"] for r in runs[tool]) for tool in TOOLS}
    per_cpu = {tool: statistics.median(r["items_per_cpu_s"] for r in runs[tool]) for tool in TOOLS}
    summary = {
        "model": str(model_dir),
        "task": str(args.task),
        "shots": args.shots,
        "items": runs["tunesmith"][0]["items"],
        "items_per_s": median,
        "ratio": median["tunesmith"] / median["lm_eval"],
        "items_per_cpu_s": per_cpu,
        "ratio_cpu": per_cpu["tunesmith"] / per_cpu["lm_eval"],
        "max_abs_loglik_diff": worst,
        "acc": {tool: runs[tool][0]["acc"] for tool in TOOLS},
    }
    table = "\n".join(
        [
            f"{'':12}{'items/s (median)':>18}{'items/CPU-s':>13}{'acc':>8}",
            *(f"{t:12}{median[t]:>18.2f}{per_cpu[t]:>13.3f}{summary['acc'][t]:>8.3f}" for t in TOOLS),
            f"ratio tunesmith / lm-eval: {summary['ratio']:.2f}x wall, {summary['ratio_cpu']:.2f}x CPU time; "
            f"max |loglik difference|: {worst:.2e}",
        ]
    )
    write_results(args, runs, summary, table)


if __name__ == "__main__":
    main()
