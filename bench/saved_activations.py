"""What one training forward keeps for its backward pass, with and without the lean layers.

    .venv/bin/python bench/saved_activations.py [--precision bf16] [--rows 4 --seq-len 1024]

Counts the bytes of every distinct storage autograd saves during one LoRA (all-linear, r16)
forward of the default model over packed rows of random tokens, through `saved_tensors_hooks`, so
the figure is what the backward will read: no allocator, no timing, no other process involved. It
also runs the backward and reports the loss of both variants (they must agree) and the per-layer
split of one decoder layer by module. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from typing import Any

import torch


def _rows(rows: int, seq_len: int, vocab: int, seed: int) -> list[list[Any]]:
    from tunesmith.data.conversation import RowRef
    from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample

    rng = random.Random(seed)
    packed = []
    for _ in range(rows):
        row, left = [], seq_len
        while left > 50:
            n = min(left, rng.randint(50, 400))
            ids = [rng.randrange(3, vocab) for _ in range(n)]
            row.append(TokenizedSample(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :], RowRef("bench", 1)))
            left -= n
        packed.append(row)
    return packed


def measure(lean: bool, precision: str, rows: int, seq_len: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.data.packing import collate_packed
    from tunesmith.models.lean_layers import apply_lean_layers
    from tunesmith.models.load import resolve_model_dir
    from tunesmith.models.varlen_attention import NAME, register_varlen_sdpa
    from tunesmith.training.losses import CausalLMWithLoss

    register_varlen_sdpa()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir("default"), dtype=torch.float32, attn_implementation=NAME
    )
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    )
    replaced = apply_lean_layers(model).replaced if lean else {}
    batch = collate_packed(_rows(rows, seq_len, model.config.vocab_size, 0), pad_id=2, block_mask="none")
    layer = model.base_model.model.model.layers[len(model.base_model.model.model.layers) // 2]
    scope = ["outside"]
    for name, module in layer.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: scope.append(name or "layer"))
        module.register_forward_hook(lambda m, a, o: (scope.pop(), None)[1])
    storages: dict[int, int] = {}
    by_module: collections.Counter[str] = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.nbytes()
            if scope[-1] != "outside":
                by_module[scope[-1]] += storage.nbytes()
        return tensor

    wrapped = CausalLMWithLoss(model, chunk_size=1024)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, count = wrapped(**batch)
    (loss_sum / count).backward()
    mib = 2**20
    return {
        "lean": lean,
        "replaced": replaced,
        "saved_mib": round(sum(storages.values()) / mib, 1),
        "one_layer_mib": {k: round(v / mib, 1) for k, v in by_module.most_common() if v >= mib / 10},
        "loss": float(loss_sum.detach() / count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    plain = measure(False, args.precision, args.rows, args.seq_len)
    lean = measure(True, args.precision, args.rows, args.seq_len)
    print(
        json.dumps(
            {
                "precision": args.precision,
                "tokens": args.rows * args.seq_len,
                "plain": plain,
                "lean": lean,
                "ratio": round(lean["saved_mib"] / plain["saved_mib"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
