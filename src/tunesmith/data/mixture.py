"""How many samples each training source contributes, which ones, and exact-duplicate removal.

Counts are decided up front, not drawn at random while training, so a run's report can say
exactly how much of each source it saw:

- a source with `samples: N` gives N samples: a seeded subset when it has more, every sample
  repeated (plus a seeded subset for the remainder) when it has fewer;
- sources with `weight` share their combined size in proportion to their weights (so 1:1 over
  sources of 100 and 900 samples gives 500 of each: the small one repeated, the large one cut);
- a source with neither gives each of its samples once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunesmith.data.tokenize import TokenizedSample


def plan_counts(
    available: Sequence[int], weights: Sequence[float | None], samples: Sequence[int | None]
) -> list[int]:
    """The number of samples each source contributes (see the module docstring)."""
    weighted = [i for i, w in enumerate(weights) if w is not None and samples[i] is None]
    shares = _largest_remainder(
        sum(available[i] for i in weighted), [float(weights[i] or 0) for i in weighted]
    )
    by_source = dict(zip(weighted, shares, strict=True))
    counts = []
    for i, n in enumerate(available):
        wanted = samples[i] if samples[i] is not None else by_source.get(i, n)
        counts.append(wanted if n else 0)
    return counts


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing exactly to `total`."""
    if not weights:
        return []
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def choose(available: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into `available` items: whole repeats plus a seeded subset, in file order."""
    if available == 0 or count == 0:
        return []
    repeats, remainder = divmod(count, available)
    return list(range(available)) * repeats + sorted(rng.sample(range(available), remainder))


def source_rng(seed: int, index: int) -> random.Random:
    """One generator per source, so adding a source does not change what the others pick."""
    return random.Random(f"tunesmith-mixture:{seed}:{index}")


def duplicates(samples: Sequence[TokenizedSample]) -> list[bool]:
    """For each sample, whether an identical one (same tokens, same labels) came before it."""
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    flags = []
    for sample in samples:
        key = (tuple(sample.input_ids), tuple(sample.labels))
        flags.append(key in seen)
        seen.add(key)
    return flags
