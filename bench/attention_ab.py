"""A/B of the packed-row attention paths on the default model: block-diagonal mask (sdpa) vs per-sample
causal SDPA (varlen), interleaved in one process so machine load affects both alike.

    .venv/bin/python bench/attention_ab.py --rows 2 --seq-len 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tunesmith.config.schema import LoraAdapter
from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed, pack_first_fit_decreasing
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.adapters import apply_adapter
from tunesmith.models.attention import packed_mask_kind
from tunesmith.models.default_model import default_model_dir
from tunesmith.models.load import load_model
from tunesmith.models.varlen_attention import NAME as VARLEN
from tunesmith.training.losses import CausalLMWithLoss


def _samples(count: int, seq_len: int, seed: int) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = min(
            seq_len, int(rng.lognormvariate(5.3, 0.6)) + 16
        )  # median ~215 tokens, like bench/make_data.py
        ids = [rng.randrange(3, 49000) for _ in range(n)]
        prompt = n // 3
        out.append(TokenizedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], RowRef("synthetic", i + 1)))
    return out


def packed_rows(count: int, seq_len: int, samples_per_row: int = 12) -> list[list[TokenizedSample]]:
    """The first `count` rows that first-fit decreasing packs from seeded synthetic samples."""
    samples = _samples(samples_per_row * count, seq_len, 0)
    bins = pack_first_fit_decreasing([len(s.input_ids) for s in samples], seq_len)[:count]
    return [[samples[i] for i in b] for b in bins]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    rows = packed_rows(args.rows, args.seq_len)
    tokens = sum(len(s.input_ids) for r in rows for s in r)
    setups = {}
    for attention in ("sdpa", VARLEN):
        if attention == VARLEN:
            from tunesmith.models.varlen_attention import register_varlen_sdpa

            register_varlen_sdpa()
        torch.manual_seed(0)
        model = apply_adapter(load_model(default_model_dir(), attention=attention), LoraAdapter())
        batch = collate_packed(rows, pad_id=2, block_mask=packed_mask_kind(attention))
        setups[attention] = (CausalLMWithLoss(model), batch)
    times: dict[str, list[float]] = {k: [] for k in setups}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (wrapped, batch) in setups.items():
            start = time.perf_counter()
            loss_sum, count = wrapped(**batch)
            (loss_sum / count).backward()
            times[name].append(time.perf_counter() - start)
            losses[name] = float((loss_sum / count).detach())
            wrapped.zero_grad(set_to_none=True)
    base = statistics.median(times["sdpa"])
    print(f"{args.rows} packed rows of {args.seq_len}, {tokens} real tokens, forward+backward (LoRA r=16)")
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"{name:24s} median {med:.2f} s  {tokens / med:7.0f} tok/s  x{base / med:.2f}  loss {losses[name]:.6f}"
        )


if __name__ == "__main__":
    main()
