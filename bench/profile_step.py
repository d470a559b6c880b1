"""Where one tunesmith LoRA optimizer step spends its time (torch.profiler, CPU).

    .venv/bin/python bench/profile_step.py --seq-len 1024 --rows 1

Runs `tunesmith.train` on the benchmark data for a few steps and profiles one step after a
warm-up step. Forward time is attributed to the module it ran in (profiler ranges pushed by
forward hooks that this script adds; nothing in tunesmith is changed), backward time to the
module whose forward op created the autograd node (torch's sequence_nr link), so "attention"
below is forward + backward of the attention block, and so on. The categories:

- attention: q/k/v/o projections (frozen base matmuls), the attention kernel itself (sdpa + rope + reshapes)
- mlp: gate/up/down projections (frozen base) and the SiLU product
- lora: every lora_A / lora_B matmul (forward and backward), in attention and MLP
- norms, embedding
- lm_head + loss: tunesmith's chunked head + cross-entropy on labelled positions
- optimizer: AdamW step; clip: gradient norm + clipping; data: building the micro-batch (packing, mask)
- grad accumulation: autograd writing .grad; other: the rest (loop, logging, Python)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402

PREFIX = "bench::"


def instrument_model(model: torch.nn.Module) -> None:
    """Push a profiler range named after the category around each interesting module's forward."""

    def category(name: str, module: torch.nn.Module) -> str | None:
        leaf = name.rsplit(".", 1)[-1]
        if ".lora_A." in name or ".lora_B." in name:  # peft: <proj>.lora_A.<adapter name> is the Linear
            return "lora"
        if leaf == "self_attn":
            return "attention.core"
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return "attention.proj"
        if leaf == "mlp":
            return "mlp.act"
        if leaf in ("gate_proj", "up_proj", "down_proj"):
            return "mlp.proj"
        if leaf.endswith("norm") or leaf == "norm":
            return "norms"
        if leaf == "embed_tokens":
            return "embedding"
        return None

    for name, module in model.named_modules():
        cat = category(name, module)
        if cat is None:
            continue

        def pre(mod: torch.nn.Module, args: Any, cat: str = cat) -> None:
            rf = record_function(PREFIX + cat)
            rf.__enter__()
            mod.__dict__.setdefault("_bench_rf", []).append(rf)

        def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
            mod.__dict__["_bench_rf"].pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def wrap(owner: Any, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + label):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)


def innermost_category(evt: Any) -> str | None:
    node = evt
    while node is not None:
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX) :]
        if node.name.startswith("Optimizer.step"):
            return "optimizer"
        if node.name.startswith("Optimizer.zero_grad"):
            return "zero_grad"
        node = node.cpu_parent
    return None


def attribute(events: Any, step_range: tuple[int, int]) -> dict[str, float]:
    """Microseconds per category for the events inside one profiled step."""
    lo, hi = step_range
    inside = [e for e in events if e.time_range.start >= lo and e.time_range.end <= hi]
    fwd_category: dict[tuple[int, int], str] = {}
    for e in inside:
        if e.sequence_nr >= 0 and e.scope != 1:
            cat = innermost_category(e)
            if cat is not None:
                fwd_category.setdefault((e.sequence_nr, e.thread), cat)
    totals: dict[str, float] = collections.defaultdict(float)

    def backward_ancestor(e: Any) -> bool:
        node = e.cpu_parent
        while node is not None:
            if node.scope == 1 or node.name.startswith("autograd::engine::evaluate_function"):
                return True
            node = node.cpu_parent
        return False

    accounted = 0.0
    for e in inside:
        if e.name.startswith("autograd::engine::evaluate_function") and not backward_ancestor(e):
            if "AccumulateGrad" in e.name:
                cat = "grad accumulation"
            else:
                cat = fwd_category.get((e.sequence_nr, e.fwd_thread), "backward: unattributed")
            totals[cat] += e.cpu_time_total
            accounted += e.cpu_time_total
    # forward (and everything not in backward): self time of ops, attributed to the innermost range
    for e in inside:
        if (
            e.name.startswith("ProfilerStep")
            or backward_ancestor(e)
            or e.name.startswith("autograd::engine::evaluate_function")
        ):
            continue
        if e.name.startswith(PREFIX):
            continue
        cat = innermost_category(e) or "other"
        totals[cat] += e.self_cpu_time_total
    return dict(totals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--workload", default="lora", choices=["lora", "full"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tunesmith-bench/profile"))
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "profile.json")
    parser.add_argument("--trace", type=Path, default=None, help="also write a chrome trace here")
    args = parser.parse_args(argv)

    import make_data
    import tunesmith
    import tunesmith.models.adapters as adapters
    import tunesmith.training.batching as batching
    import tunesmith.training.loop as loop
    import tunesmith.training.losses as losses

    data = args.work_dir / "train.jsonl"
    make_data.write_jsonl(make_data.make_dataset(args.samples, 0), data)

    # Instrumentation, added from outside: module hooks and named ranges around a few functions.
    original_apply = adapters.apply_adapter

    def apply_and_instrument(model: Any, adapter: Any) -> Any:
        model = original_apply(model, adapter)
        instrument_model(model)
        return model

    adapters.apply_adapter = apply_and_instrument
    wrap(losses, "chunked_lm_loss_sum", "lm_head + loss")
    wrap(batching.BatchStream, "micro_batch", "data")
    wrap(loop.Trainer, "_clip", "clip")

    schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule, record_shapes=False
    )
    original_step = loop.Trainer._train_step
    step_walls: list[float] = []

    def profiled_step(self: Any) -> dict[str, Any]:
        start = time.perf_counter()
        row = original_step(self)
        step_walls.append(time.perf_counter() - start)
        prof.step()
        return row

    loop.Trainer._train_step = profiled_step
    adapter = {"type": "lora", "r": 16, "alpha": 16} if args.workload == "lora" else {"type": "full"}
    cfg = {
        "model": "default",
        "adapter": adapter,
        "data": {"train": [{"path": str(data)}], "seq_len": args.seq_len, "packing": True},
        "train": {
            "max_steps": 1 + args.steps,
            "batch_size": args.rows,
            "lr": 2e-4,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "precision": args.precision,
            "seed": 0,
        },
        "output": {"dir": str(args.work_dir / "run"), "overwrite": True},
    }
    with prof:
        tunesmith.train(cfg, show_progress=False)

    events = prof.events()
    ranges = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.name.startswith("ProfilerStep")
    )
    per_step = [attribute(events, r) for r in ranges]
    walls = [(hi - lo) / 1e6 for lo, hi in ranges]
    rows = [json.loads(x) for x in (args.work_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    tokens = [rows[i]["tokens"] - (rows[i - 1]["tokens"] if i else 0) for i in range(len(rows))][1:]
    cats = sorted({k for d in per_step for k in d})
    parts = {k: statistics.median([d.get(k, 0.0) / 1e6 for d in per_step]) for k in cats}
    wall = statistics.median(walls)
    top = sorted(parts.items(), key=lambda kv: -kv[1])
    print(
        f"profiled {len(walls)} steps of {args.rows} packed row(s) x {args.seq_len}: wall {[round(w, 2) for w in walls]} s "
        f"(unprofiled step walls incl. warm-up: {[round(w, 2) for w in step_walls]}); real tokens {tokens}"
    )
    print("median per step:\n| part | seconds | share of step |\n|---|---:|---:|")
    for k, v in top:
        if v >= 0.005:
            print(f"| {k} | {v:.2f} | {v / wall:.1%} |")
    print(f"| (step wall) | {wall:.2f} | 100% |")
    ops: dict[str, float] = collections.defaultdict(float)
    for lo, hi in ranges:
        for e in events:
            if (
                lo <= e.time_range.start
                and e.time_range.end <= hi
                and not e.name.startswith((PREFIX, "ProfilerStep"))
            ):
                ops[e.name] += e.self_cpu_time_total / 1e6 / len(ranges)
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    print("\nTop ops by self CPU time (mean per step):")
    for k, v in top_ops:
        print(f"  {v:7.2f} s  {v / wall:6.1%}  {k}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "step_wall_s": walls,
                "step_tokens": tokens,
                "parts_median_s": dict(top),
                "top_ops_mean_s": dict(top_ops),
                "unprofiled_step_walls_s": step_walls,
                "loadavg_1min": os.getloadavg()[0],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
