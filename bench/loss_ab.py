"""A/B of the LM head + loss: transformers' full-logits cross-entropy against tunesmith's chunked head
on labelled positions only, on the default model with LoRA. Each variant runs in its own process so
that peak RSS is its own.

    .venv/bin/python bench/loss_ab.py --rows 2 --seq-len 1024 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from attention_ab import packed_rows
from tunesmith.config.schema import LoraAdapter
from tunesmith.data.packing import collate_packed
from tunesmith.models.adapters import apply_adapter
from tunesmith.models.default_model import default_model_dir
from tunesmith.models.load import load_model
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.models.varlen_attention import register_varlen_sdpa
from tunesmith.training.losses import CausalLMWithLoss


def run_variant(variant: str, rows: int, seq_len: int, rounds: int) -> dict:
    torch.set_flush_denormal(True)
    register_varlen_sdpa()
    packed = packed_rows(rows, seq_len)
    batch = collate_packed(packed, pad_id=2, block_mask="none")
    torch.manual_seed(0)
    model = apply_adapter(load_model(default_model_dir(), attention=VARLEN), LoraAdapter())
    wrapped = CausalLMWithLoss(model)
    times, loss = [], 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        if variant == "chunked":
            loss_sum, count = wrapped(**batch)
            mean = loss_sum / count
        else:  # what a plain transformers model does: logits for every position, then CE
            mean = model(**batch).loss
        mean.backward()
        times.append(time.perf_counter() - start)
        loss = float(mean.detach())
        model.zero_grad(set_to_none=True)
    tokens = sum(len(s.input_ids) for r in packed for s in r)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "times": times, "loss": loss, "tokens": tokens, "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.rows, args.seq_len, args.rounds)))
        return
    results = {}
    for variant in ("full", "chunked"):  # fp32: the same numbers either way
        cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows)]
        cmd += ["--seq-len", str(args.seq_len), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    t_full, t_chunked = statistics.median(full["times"][1:]), statistics.median(chunked["times"][1:])
    print(
        f"{args.rows} packed rows of {args.seq_len}, {full['tokens']} real tokens, LoRA forward + backward, fp32"
    )
    for r, t in ((full, t_full), (chunked, t_chunked)):
        print(
            f"{r['variant']:8s} median {t:.2f} s  peak RSS {r['peak_rss'] / 1e9:.2f} GB  loss {r['loss']:.6f}"
        )
    print(
        f"chunked vs full logits: x{t_full / t_chunked:.2f} speed, {(full['peak_rss'] - chunked['peak_rss']) / 1e9:.2f} GB less peak RSS"
    )


if __name__ == "__main__":
    main()
