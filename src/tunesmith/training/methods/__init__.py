"""Training methods by name; each turns a batch into a loss."""

from __future__ import annotations

from tunesmith.training.methods.base import Method


def get_method(name: str) -> Method:
    from tunesmith.training.methods.pretrain import Pretrain
    from tunesmith.training.methods.sft import SFT

    methods: dict[str, type] = {"sft": SFT, "pretrain": Pretrain}
    if name not in methods:
        raise ValueError(f"method: unknown method {name!r} (available: {', '.join(methods)})")
    return methods[name]()
