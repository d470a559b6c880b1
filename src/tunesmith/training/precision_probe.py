"""How much faster a bf16 matmul is than an fp32 one on this CPU, measured once and remembered.

One CPU flag does not say whether bf16 pays: AMX CPUs run bf16 matmuls ~6x faster than fp32,
AVX512_BF16 CPUs without AMX ~4.6x, and CPUs with neither emulate bf16 and run it slower than fp32.
So `precision: auto` times both on matmul shapes like a small model's layers (a fraction of a
second) and keeps the ratio in the cache, keyed by CPU model, torch version and thread count.
"""

from __future__ import annotations

import json
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

PROBE_SHAPE = (1024, 576, 1536)
"""(tokens, in, out): the default model's MLP projection on a 1024-token row."""
PROBE_BUDGET_S = 0.4
"""Wall time the probe may spend once it has its minimum number of timings."""
PROBE_MIN_REPEATS = 3


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _time_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def measure_bf16_speedup(
    shape: tuple[int, int, int] = PROBE_SHAPE, budget_s: float = PROBE_BUDGET_S
) -> float:
    """fp32 matmul time / bf16 matmul time: the fastest of alternating runs, after one warm-up each.

    The fastest run is the least disturbed by other processes on a shared machine (they only ever
    slow a run down), so the ratio of minima is steadier than a ratio of medians."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    _time_matmul(a32, b32), _time_matmul(a16, b16)  # first calls pick kernels and allocate
    fp32_times, bf16_times = [], []
    start = time.perf_counter()
    while len(fp32_times) < PROBE_MIN_REPEATS or time.perf_counter() - start < budget_s:
        fp32_times.append(_time_matmul(a32, b32))
        bf16_times.append(_time_matmul(a16, b16))
        if len(fp32_times) >= 50:
            break
    return min(fp32_times) / max(min(bf16_times), 1e-9)


def _cache_file() -> Path:
    from tunesmith.models.gguf_cache import cache_root

    return cache_root() / "probe" / "bf16_speedup.json"


def _probe_key() -> str:
    return f"{cpu_model_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """The measured ratio for this CPU, torch and thread count: from the cache, else measured now."""
    from tunesmith.training.durable import write_text_atomic

    path, key = _cache_file(), _probe_key()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), int | float):
        return float(entry["speedup"])
    speedup = measure_bf16_speedup()
    known[key] = {"speedup": round(speedup, 3), "shape": list(PROBE_SHAPE)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache costs a re-measurement next time, nothing else
    return speedup
