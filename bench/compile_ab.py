"""A/B of `train.compile` (each decoder layer compiled) against eager, on the default model with LoRA.

    .venv/bin/python bench/compile_ab.py --precision bf16 --batches 3 --rounds 3

Both models train on the same packed rows (several different batches, so that recompiles for new
shapes are counted). Reports the one-off compile cost (first pass over each batch shape minus an
eager step) and steady-state seconds per step, interleaved so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attention_ab import packed_rows
from tunesmith.config.schema import LoraAdapter
from tunesmith.data.packing import collate_packed
from tunesmith.models.adapters import apply_adapter, compile_decoder_layers
from tunesmith.models.attention import packed_mask_kind
from tunesmith.models.default_model import default_model_dir
from tunesmith.models.load import load_model
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.models.varlen_attention import register_varlen_sdpa
from tunesmith.training.losses import CausalLMWithLoss
from tunesmith.training.precision import store_frozen_linear_weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches (shapes)")
    parser.add_argument("--rounds", type=int, default=3, help="steady-state passes over the batches")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    register_varlen_sdpa()
    every_row = packed_rows(args.rows * args.batches, args.seq_len, samples_per_row=14)
    batches = []
    for b in range(args.batches):
        rows = every_row[b * args.rows : (b + 1) * args.rows]
        tokens = sum(len(s.input_ids) for r in rows for s in r)
        batches.append((collate_packed(rows, pad_id=2, block_mask=packed_mask_kind(VARLEN)), tokens))
    bf16 = args.precision == "bf16"
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = apply_adapter(load_model(default_model_dir(), attention=VARLEN), LoraAdapter())
        if bf16:
            store_frozen_linear_weights(model, torch.bfloat16)
        if name == "compiled":
            compile_decoder_layers(model)
        models[name] = CausalLMWithLoss(model)

    def step(name: str, batch: dict) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss_sum, count = models[name](**batch)
        loss = loss_sum / count
        loss.backward()
        models[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss.detach())

    first: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    for batch, _ in batches:  # first pass: includes compiling for each new shape
        for name in models:
            seconds, loss = step(name, batch)
            first[name].append(seconds)
            losses[name].append(loss)
    steady: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for batch, _ in batches:
            for name in models:
                steady[name].append(step(name, batch)[0])
    tokens = statistics.mean(t for _, t in batches)
    eager_s, compiled_s = statistics.median(steady["eager"]), statistics.median(steady["compiled"])
    compile_cost = sum(first["compiled"]) - sum(first["eager"])
    print(
        f"{args.precision}, {args.batches} batches of {args.rows} packed rows of {args.seq_len} (mean {tokens:.0f} real tokens)"
    )
    print(f"eager     median {eager_s:.2f} s/step  {tokens / eager_s:6.0f} tok/s")
    print(
        f"compiled  median {compiled_s:.2f} s/step  {tokens / compiled_s:6.0f} tok/s  x{eager_s / compiled_s:.2f}"
    )
    print(
        f"first pass per batch, compiled: {', '.join(f'{s:.1f}' for s in first['compiled'])} s; "
        f"one-off compile cost {compile_cost:.0f} s; pays back after {compile_cost / max(eager_s - compiled_s, 1e-9):.0f} steps"
    )
    print("losses eager   ", ", ".join(f"{v:.5f}" for v in losses["eager"]))
    print("losses compiled", ", ".join(f"{v:.5f}" for v in losses["compiled"]))


if __name__ == "__main__":
    main()
