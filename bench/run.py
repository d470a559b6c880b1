"""tunesmith side by side with what a user would pick instead, in one invocation.

    .venv/bin/python bench/run.py --seq-len 1024 --steps 10 --repeats 3
    .venv/bin/python bench/run.py --quick          # a smoke run: minutes, numbers not meaningful

Every tool trains the same model (the default SmolLM2-135M-Instruct) on the same tokenized
samples (the same labels: assistant tokens only), for one epoch, with the same optimizer (fused
AdamW, lr, no weight decay, grad-norm clip 1.0), constant learning rate and seed. Each run is its own
subprocess, so peak RSS is per tool; runs are interleaved (A, B, C, A, B, C, ...) because these
machines are shared and noisy, and the table reports medians over repeats and ratios.

Work per optimizer step: the per-sample tool (Trainer) takes `--batch` samples per step; the
packing tools (tunesmith, TRL) take packed rows of `--seq-len` tokens, as many per step as makes
their number of steps closest to the Trainer's. Every tool sees exactly the same samples once, so
tokens/s compares the same work.

Precision (--precision): `fp32` runs every tool in fp32; `bf16` runs every tool in bf16 mixed precision
(autocast, fp32 trainable weights); `default` runs each tool with its own defaults on this machine:
tunesmith `precision: auto` (bf16 on CPUs with AMX), the Trainer in fp32 (bf16=False), TRL with bf16 and
gradient checkpointing (SFTConfig's defaults). MFU is taken against the matmul ceiling of the dtype the
tunesmith run computes in.

Results: a JSON file (--results), the markdown table on stdout, and the loss curves (--plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402
import make_data  # noqa: E402

TOOLS_BY_WORKLOAD = {
    "lora": ["tunesmith", "trainer", "trl", "tunesmith_nopack"],
    "full": ["tunesmith", "trainer", "tunesmith_nopack"],
}
PARITY_TOOLS = {"tunesmith_nopack"}  # run once, for the loss comparison, not timed against the others
LABELS = {
    "tunesmith": "tunesmith",
    "trainer": "HF Trainer (+ peft for LoRA)",
    "trl": "TRL SFTTrainer (packing)",
    "tunesmith_nopack": "tunesmith, packing off (parity check)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tunesmith vs transformers Trainer and TRL SFTTrainer")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of the per-sample baseline")
    p.add_argument("--batch", type=int, default=4, help="samples per step of the per-sample baseline")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default="lora,full", help="comma list of lora, full")
    p.add_argument(
        "--tools",
        default=None,
        help="comma list restricting tools (tunesmith, trainer, trl, tunesmith_nopack: the parity check, run once)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "default"],
        default="fp32",
        help="fp32 or bf16 for every tool alike, or each tool's own default",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--n-eval", type=int, default=16, help="held-out conversations for the final loss")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 repeat, seq 512, LoRA only, 4 eval rows")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tunesmith-bench"))
    p.add_argument("--results", type=Path, default=BENCH / "results" / "latest.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "bench-loss-curves-latest.png")
    p.add_argument("--report", type=Path, default=None, help="only re-summarize and re-plot a results JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.seq_len, args.n_eval = 3, 1, 512, 4
        if args.workloads == "lora,full":
            args.workloads = "lora"
        if args.results == BENCH / "results" / "latest.json":
            args.results = args.work_dir / "quick.json"
        if args.plot == REPO / "docs" / "bench-loss-curves-latest.png":
            args.plot = args.work_dir / "quick-loss-curves.png"
    return args


# ----------------------------------------------------------------------------- data


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Write the jsonl, tokenize it once with tunesmith's own pipeline, and pack it to count rows."""
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.build import build_data
    from tunesmith.data.packing import pack_first_fit_decreasing
    from tunesmith.models.default_model import default_model_dir
    from tunesmith.models.load import load_tokenizer

    data_dir = args.work_dir / "data"
    n_train = args.steps * args.batch
    make_data.write_jsonl(make_data.make_dataset(n_train, args.seed), data_dir / "train.jsonl")
    make_data.write_jsonl(make_data.make_dataset(args.n_eval, args.seed + 10_000), data_dir / "eval.jsonl")
    model_dir = default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    out: dict[str, Any] = {"model_dir": str(model_dir), "train_jsonl": str(data_dir / "train.jsonl")}
    for split in ("train", "eval"):
        built = build_data(
            DataConfig(train=[{"path": str(data_dir / f"{split}.jsonl")}], seq_len=args.seq_len),
            tokenizer,
            "sft",
        )
        samples = [{"input_ids": s.input_ids, "labels": s.labels} for s in built.train]
        (data_dir / f"{split}.tokenized.json").write_text(json.dumps(samples), encoding="utf-8")
        out[f"{split}_tokenized"] = str(data_dir / f"{split}.tokenized.json")
        out[f"{split}_report"] = built.report.summary()
        if split == "train":
            lengths = [len(s.input_ids) for s in built.train]
            trained = [s.num_trained for s in built.train]
    rows = len(pack_first_fit_decreasing(lengths, args.seq_len))
    out.update(
        lengths=lengths,
        trained=trained,
        packed_rows=rows,
        rows_per_step=max(1, round(rows / args.steps)),
        length_stats=length_stats(lengths),
    )
    return out


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)

    def q(f: float) -> int:
        return ordered[min(len(ordered) - 1, int(f * len(ordered)))]

    return {
        "n": len(ordered),
        "tokens": sum(ordered),
        "mean": round(statistics.mean(ordered), 1),
        "min": ordered[0],
        "p10": q(0.1),
        "median": q(0.5),
        "p90": q(0.9),
        "max": ordered[-1],
    }


# ----------------------------------------------------------------------------- one subprocess


def run_worker(spec: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import psutil

    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    spec_path.write_text(json.dumps({**spec, "work_dir": str(run_dir)}), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "worker.py"), str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    polled = {"peak": 0}

    def poll() -> None:  # a second opinion on peak RSS: the process tree, sampled every 0.1 s
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
                polled["peak"] = max(polled["peak"], rss)
                time.sleep(0.1)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    code = proc.wait()
    load_after = os.getloadavg()[0]
    watcher.join()
    if code != 0 or not result_path.is_file():
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        return {"error": f"exit code {code}", "log_tail": tail, "process_s": time.perf_counter() - start}
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["polled_peak_rss"] = polled["peak"]
    result["loadavg_1min"] = [round(load_before, 2), round(load_after, 2)]
    return result


# ----------------------------------------------------------------------------- summary


def ceiling_dtype(precision: str) -> Any:
    """The dtype tunesmith computes in under this setting: the matmul ceiling MFU is taken against."""
    import torch

    from tunesmith.training.precision import resolve_precision

    resolved = resolve_precision("auto" if precision == "default" else precision, "cpu")
    return torch.bfloat16 if resolved == "bf16" else torch.float32


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def epoch_mean_loss(steps: list[dict[str, Any]]) -> float:
    """Train loss averaged over every trained token of the epoch (each step weighted by its trained tokens).

    Every tool trains on the same tokens once, so this compares like with like even where the
    tools group samples into steps differently (the last step's loss depends on which samples it holds).
    """
    total, weight, before = 0.0, 0, 0
    for s in steps:
        n = s["trained_tokens"] - before
        before = s["trained_tokens"]
        total += s["loss"] * n
        weight += n
    return total / max(weight, 1)


def best_of_steps_seconds(runs: list[dict[str, Any]]) -> float | None:
    """Sum over steps of the fastest repeat of that step.

    A tool's repeats train on identical batches (same seed), and a shared machine only ever makes a
    step slower, so the per-step minimum over repeats is the least disturbed estimate of its time.
    """
    if not runs or len({len(r["steps"]) for r in runs}) != 1:
        return None
    per_run = []
    for r in runs:
        ends = [s["elapsed_s"] for s in r["steps"]]
        per_run.append([b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)])
    return sum(min(times) for times in zip(*per_run, strict=True))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    data, peaks = results["data"], results["matmul_peak_flops"]
    peak = statistics.median(peaks)
    total_tokens = sum(data["lengths"])
    summary: dict[str, Any] = {}
    for workload, by_tool in results["runs"].items():
        need = results["useful_flops"][workload]["total"]
        rows = {}
        for tool, runs in by_tool.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                rows[tool] = {"error": runs[-1]["error"] if runs else "not run"}
                continue
            tps = [total_tokens / r["train_s"] for r in ok]
            best_s = best_of_steps_seconds(ok)
            finals = [r["steps"][-1]["loss"] for r in ok]
            seen = [r["steps"][-1]["tokens"] for r in ok]
            sources = sorted({json.dumps(r.get("source"), sort_keys=True) for r in ok})
            rows[tool] = {
                "repeats": len(ok),
                "sources": [json.loads(x) for x in sources],
                "source_changed_during_run": any(r.get("source_changed_during_run") for r in ok),
                "tokens_per_s": median(tps),
                "tokens_per_s_all": [round(v, 2) for v in tps],
                "best_of_steps_s": best_s,
                "tokens_per_s_best_steps": total_tokens / best_s if best_s and len(ok) > 1 else None,
                "tokens_per_cpu_s": median([total_tokens / r["cpu_s"] for r in ok]),
                "loadavg": [r["loadavg_1min"] for r in ok],
                "train_s": median([r["train_s"] for r in ok]),
                "wall_s": median([r["wall_s"] for r in ok]),
                "steps": len(ok[0]["steps"]),
                "peak_rss_gb": median([r["peak_rss"] / 1e9 for r in ok]),
                "polled_peak_rss_gb": median([r["polled_peak_rss"] / 1e9 for r in ok]),
                "rss_by_phase_gb": {
                    name: median([r["rss_by_phase"][name] / 1e9 for r in ok])
                    for name in ok[0].get("rss_by_phase", {})
                },
                "final_train_loss": median(finals),
                "epoch_mean_loss": median([epoch_mean_loss(r["steps"]) for r in ok]),
                "heldout_loss": median([r["heldout_loss"] for r in ok]),
                "tokens_seen": seen[0],
                "tokens_match": all(s == total_tokens for s in seen),
                "achieved_gflops": median([need / r["train_s"] / 1e9 for r in ok]),
                "mfu": median([need / r["train_s"] / peak for r in ok]),
                "mfu_best_steps": need / best_s / max(peaks) if best_s and len(ok) > 1 else None,
            }
        summary[workload] = rows
    return summary


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _phase_table(rows: dict[str, Any]) -> list[str]:
    """Peak resident memory by phase: setup (imports, load, data), the first step, the rest."""
    measured = {tool: r["rss_by_phase_gb"] for tool, r in rows.items() if r.get("rss_by_phase_gb")}
    if not measured:
        return []
    lines = ["", "| peak RSS by phase (GB) | setup: load and data | first step | later steps |"]
    lines.append("|---|---:|---:|---:|")
    for tool, phases in measured.items():
        lines.append(
            f"| {LABELS[tool]} | {phases['setup']:.2f} | {phases['first_step']:.2f} | {phases['steady']:.2f} |"
        )
    return lines


def markdown_tables(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = []
    base_loss = results.get("base_heldout_loss")
    for workload, rows in summary.items():
        lines.append(f"**{'LoRA r=16, all linear layers' if workload == 'lora' else 'Full fine-tuning'}**\n")
        lines.append(
            "| tool | steps | real tokens/s: median (each repeat) | best-of-repeats per step "
            "| peak RSS (GB) | last-step loss | epoch-mean loss | held-out loss | MFU: median, best |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tool, r in rows.items():
            if "error" in r:
                lines.append(f"| {LABELS[tool]} | failed: {r['error']} |||||||| ")
                continue
            every = ", ".join(f"{v:.0f}" for v in r["tokens_per_s_all"])
            lines.append(
                f"| {LABELS[tool]} | {r['steps']} | {fmt(r['tokens_per_s'], '.1f')} ({every}) "
                f"| {fmt(r['tokens_per_s_best_steps'], '.1f')} | {fmt(r['peak_rss_gb'], '.2f')} "
                f"| {fmt(r['final_train_loss'], '.3f')} | {fmt(r['epoch_mean_loss'], '.4f')} "
                f"| {fmt(r['heldout_loss'], '.4f')} | {fmt(r['mfu'], '.1%')}, {fmt(r['mfu_best_steps'], '.1%')} |"
            )
        for tool, r in rows.items():
            if "error" not in r and (len(r["sources"]) > 1 or r["source_changed_during_run"]):
                lines.append(
                    f"\nWARNING: {LABELS[tool]} runs used different tunesmith sources "
                    f"({', '.join(str(x) for x in r['sources'])}); src/ changed during the benchmark."
                )
        ours = rows.get("tunesmith", {})
        ratio_lines = []
        for tool, r in rows.items():
            if tool in ("tunesmith", "tunesmith_nopack") or "error" in r or not ours or "error" in ours:
                continue
            best = (
                f"{ours['tokens_per_s_best_steps'] / r['tokens_per_s_best_steps']:.2f}x"
                if ours.get("tokens_per_s_best_steps") and r.get("tokens_per_s_best_steps")
                else "n/a"
            )
            ratio_lines.append(
                f"| tunesmith vs {LABELS[tool]} | {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x | {best} "
                f"| {ours['peak_rss_gb'] / r['peak_rss_gb']:.2f}x "
                f"| {ours['epoch_mean_loss'] - r['epoch_mean_loss']:+.4f} "
                f"| {ours['heldout_loss'] - r['heldout_loss']:+.4f} |"
            )
        if ratio_lines:
            lines.append("")
            lines.append(
                "| ratio | tokens/s, median | tokens/s, best-of-repeats per step | peak RSS "
                "| epoch-mean loss difference | held-out loss difference |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|")
            lines.extend(ratio_lines)
        lines.extend(_phase_table(rows))
        lines.append("")
    if base_loss is not None:
        lines.append(f"Held-out loss of the untrained model: {base_loss:.4f}.\n")
    return "\n".join(lines)


STYLES = {
    "tunesmith_nopack": dict(color="C3", linewidth=1.0, marker="x", markersize=4, linestyle="-.", zorder=4),
    "tunesmith": dict(color="C0", linewidth=2.6, marker="o", markersize=4, zorder=1),
    "trainer": dict(color="C1", linewidth=1.3, marker="s", markersize=3, linestyle="--", zorder=2),
    "trl": dict(color="C2", linewidth=1.3, marker="^", markersize=3, linestyle=":", zorder=3),
}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["runs"])
    fig, axes = plt.subplots(2, len(workloads), figsize=(6.2 * len(workloads), 7.2), dpi=110, squeeze=False)
    for col, workload in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        for tool, runs in results["runs"][workload].items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                continue
            steps = ok[0]["steps"]  # seeded: every repeat trains on the same batches
            row = results["summary"][workload][tool]
            x = [s["tokens"] for s in steps]
            top.plot(
                x, [s["loss"] for s in steps], label=f"{LABELS[tool]} ({len(steps)} steps)", **STYLES[tool]
            )
            running, total, before = [], 0.0, 0
            for s in steps:
                total += s["loss"] * (s["trained_tokens"] - before)
                before = s["trained_tokens"]
                running.append(total / max(before, 1))
            bottom.plot(
                x,
                running,
                label=f"{LABELS[tool]}: epoch mean {row['epoch_mean_loss']:.3f}, "
                f"held-out {row['heldout_loss']:.3f}",
                **STYLES[tool],
            )
        name = "LoRA r=16" if workload == "lora" else "full fine-tuning"
        top.set_title(f"{name}: train loss of each optimizer step", fontsize=10)
        bottom.set_title(f"{name}: running mean over the epoch (per trained token)", fontsize=10)
        for ax in (top, bottom):
            ax.set_xlabel("real tokens trained on")
            ax.set_ylabel("loss (nats / trained token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx"))]
    except OSError:
        pass
    import peft
    import transformers

    info = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def report_only(path: Path, plot_path: Path) -> dict[str, Any]:
    results = json.loads(path.read_text(encoding="utf-8"))
    results["summary"] = summarize(results)
    results["tables"] = markdown_tables(results)
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, plot_path)
    print_footer(results, path, plot_path)
    return results


def print_footer(results: dict[str, Any], path: Path, plot_path: Path) -> None:
    peak = statistics.median(results["matmul_peak_flops"])
    m = results["machine"]
    dtype = str(ceiling_dtype(results["args"].get("precision", "fp32"))).removeprefix("torch.")
    print(
        f"\n{results['command']}\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
        f"{dtype} matmul ceiling (2048^3, median of {len(results['matmul_peak_flops'])} interleaved measurements): "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    print(results["tables"])
    print(f"results: {path}\nloss curves: {plot_path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        return report_only(args.report, args.plot)
    from transformers import AutoConfig

    args.work_dir.mkdir(parents=True, exist_ok=True)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    only = {t.strip() for t in args.tools.split(",")} if args.tools else None
    plan = [(w, t) for w in workloads for t in TOOLS_BY_WORKLOAD[w] if only is None or t in only]
    if any(t == "trl" for _, t in plan):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install -e '.[bench]'); skipping it", file=sys.stderr)
            plan = [(w, t) for w, t in plan if t != "trl"]

    data = prepare_data(args)
    shape = flops.ModelShape.from_config(AutoConfig.from_pretrained(data["model_dir"]))
    results: dict[str, Any] = {
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(),
        "model": flops.describe(shape, args.lora_r),
        "data": {k: v for k, v in data.items() if k not in ("train_tokenized", "eval_tokenized")},
        "useful_flops": {
            w: flops.useful_flops(shape, data["lengths"], data["trained"], w, args.lora_r) for w in workloads
        },
        "matmul_peak_flops": [],
        "runs": {w: {t: [] for w2, t in plan if w2 == w} for w in workloads},
    }
    stats = data["length_stats"]
    print(
        f"data: {stats['n']} samples, {stats['tokens']} real tokens (mean {stats['mean']}, median "
        f"{stats['median']}, p90 {stats['p90']}, max {stats['max']}); {data['packed_rows']} packed rows of "
        f"{args.seq_len} -> {data['rows_per_step']} row(s) per step for the packing tools",
        flush=True,
    )
    base_spec = {
        "model_dir": data["model_dir"],
        "train_jsonl": data["train_jsonl"],
        "train_tokenized": data["train_tokenized"],
        "eval_tokenized": data["eval_tokenized"],
        "seq_len": args.seq_len,
        "samples_per_step": args.batch,
        "rows_per_step": data["rows_per_step"],
        "lr": args.lr,
        "seed": args.seed,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "precision": args.precision,
    }
    base = run_worker({**base_spec, "tool": "base", "workload": "none"}, args.work_dir / "base")
    results["base_heldout_loss"] = base.get("heldout_loss")
    results["base_peak_rss"] = base.get("peak_rss")

    for repeat in range(args.repeats):
        results["matmul_peak_flops"].append(flops.matmul_peak_flops(dtype=ceiling_dtype(args.precision)))
        for workload, tool in plan:
            if tool in PARITY_TOOLS and repeat > 0:
                continue  # its losses are deterministic; one run shows them
            t = time.perf_counter()
            res = run_worker(
                {**base_spec, "tool": tool, "workload": workload},
                args.work_dir / f"{workload}-{tool}-{repeat}",
            )
            results["runs"][workload][tool].append(res)
            if "error" in res:
                print(
                    f"[{repeat + 1}/{args.repeats}] {workload} {tool}: FAILED ({res['error']})\n{res['log_tail']}",
                    flush=True,
                )
            else:
                print(
                    f"[{repeat + 1}/{args.repeats}] {workload} {tool}: {len(res['steps'])} steps, "
                    f"{sum(data['lengths']) / res['train_s']:.1f} tok/s, train {res['train_s']:.1f}s "
                    f"(CPU {res['cpu_s']:.0f}s, load {res['loadavg_1min']}), "
                    f"peak RSS {res['peak_rss'] / 1e9:.2f} GB, final loss {res['steps'][-1]['loss']:.4f}, "
                    f"held-out {res['heldout_loss']:.4f} ({time.perf_counter() - t:.0f}s)",
                    flush=True,
                )
            # saved after every run: an interrupted benchmark can still be summarized with --report
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1), encoding="utf-8")
    results["matmul_peak_flops"].append(flops.matmul_peak_flops(dtype=ceiling_dtype(args.precision)))
    results["summary"] = summarize(results)
    results["tables"] = markdown_tables(results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, args.plot)
    print_footer(results, args.results, args.plot)
    return results


if __name__ == "__main__":
    main()
