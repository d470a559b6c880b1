"""The behaviour check of a GGUF LoRA adapter (`--adapter-only`): read back, rebuilt, compared.

A file holding only A and B has no logits of its own to compare; what it must do is rebuild the
trained weights when llama.cpp applies it to the base, so that is what is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.export.verify import Check, VerifyResult, gguf_field

LORA_BOUNDS = {"f32": 1e-3, "f16": 5e-3, "bf16": 4e-2, "q8_0": 4e-2}
"""GGUF LoRA adapters: max |base + (alpha / rank) * B @ A - merged| relative to the largest change the
LoRA makes to that weight (max |merged - base|). Measured on a tiny llama's trained rank-8 LoRA: f32
1.4e-7, f16 4.1e-4, bf16 3.0e-3, q8_0 4.3e-3 (the rounding of A and B); f32 1.7e-4 on SmolLM2-135M,
where the merged float32 weights round away part of a change much smaller than the weights."""


def verify_lora_gguf(path: Path, written: Any, base: dict[str, Any], merged: dict[str, Any]) -> VerifyResult:
    """Read a GGUF LoRA adapter back with gguf's reader and rebuild every adapted weight the way
    llama.cpp applies it (base + alpha / rank * lora_b @ lora_a), against the merged model's weights.

    `written` is the `gguf_lora.LoraExport`; `base` and `merged` hold the adapted weights in GGUF layout
    by GGUF name (`gguf_lora.base_weights` before and after merging)."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(path)
    meta = {
        key: gguf_field(reader, key)
        for key in ("general.type", "adapter.type", "general.architecture", "adapter.lora.alpha")
    }
    tensors = {
        t.name: dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        for t in reader.tensors
    }
    del reader
    expected = {"general.type": "adapter", "adapter.type": "lora", "general.architecture": written.arch}
    wrong = [
        f"{key} is {meta[key]!r}, not {value!r}" for key, value in expected.items() if meta[key] != value
    ]
    alpha = meta["adapter.lora.alpha"]
    checks = [
        Check(
            "adapter metadata",
            not wrong and alpha is not None,
            "; ".join(wrong) or f"a LoRA adapter for {written.arch}, alpha {alpha:g}",
        )
    ]
    wanted = {t.gguf_name + suffix for t in written.targets for suffix in (".lora_a", ".lora_b")}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    checks.append(
        Check(
            "adapter tensors",
            not missing and not extra,
            f"{len(written.targets)} adapted weights, each with .lora_a and .lora_b"
            + (f"; missing {missing[:4]}" if missing else "")
            + (f"; unexpected {extra[:4]}" if extra else ""),
        )
    )
    worst, worst_name = 0.0, ""
    for target in written.targets:
        a, b = tensors.get(target.gguf_name + ".lora_a"), tensors.get(target.gguf_name + ".lora_b")
        if a is None or b is None or alpha is None:
            continue
        delta = np.float64(alpha) / a.shape[0] * (b.astype(np.float64) @ a.astype(np.float64))
        change = np.abs(merged[target.gguf_name].astype(np.float64) - base[target.gguf_name]).max()
        error = np.abs(base[target.gguf_name] + delta - merged[target.gguf_name]).max() / max(change, 1e-12)
        if error > worst:
            worst, worst_name = float(error), target.gguf_name
    bound = LORA_BOUNDS[written.type]
    checks.insert(
        0,
        Check(
            "base + (alpha / rank) * B @ A vs the merged weights",
            worst <= bound and alpha is not None,
            f"max |diff| {worst:.2g} of the LoRA's largest change (bound {bound:g})"
            + (f", at {worst_name}" if worst_name else "")
            + ("" if worst <= bound else ": the adapter does not rebuild the trained weights"),
        ),
    )
    return VerifyResult(
        str(path),
        f"lora-{written.type}",
        all(c.passed for c in checks),
        checks,
        {"max_rel_diff": worst, "alpha": float(alpha or 0.0), "targets": len(written.targets)},
    )
