"""Which adapter each batch row runs with, and how a forward is told.

Several LoRA adapters live in one PeftModel over one frozen base. PEFT's mixed-batch forward
(`adapter_names=[...]`, one name per row, `"__base__"` for the bare base) lets rows of different
adapters share one forward: the base matmuls run once for the whole batch and each adapter's small
update runs on its own rows. Adapters PEFT cannot mix (DoRA, non-LoRA types) fall back to one batch
per adapter, each switched in with `set_adapter` (or `disable_adapter` for the base) before its step.
The engine thread is the only caller, so switching the active adapter needs no lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
ONE_BATCH = "*"  # the group key when every row can share one batch


class AdapterRouting:
    """Groups rows into batches that can share a forward, and gives each forward its adapter switch."""

    def __init__(self, model: Any, mix: bool = True) -> None:
        """mix=False forces one batch per adapter even where PEFT could mix them."""
        self.model = model
        configs = getattr(model, "peft_config", None) or {}
        self.adapters: frozenset[str] = frozenset(configs)
        self.mixed = mix and bool(configs) and all(_mixable(config) for config in configs.values())
        self._active: str | None = None

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r} is loaded")

    def group_of(self, adapter: str | None) -> Hashable:
        """Rows with the same key are decoded in one batch."""
        return ONE_BATCH if self.mixed or not self.adapters else (adapter or BASE)

    @contextmanager
    def forward(self, adapters: list[str | None]) -> Iterator[dict[str, Any]]:
        """Yield the extra forward kwargs for rows running `adapters` (None = the base).

        Rows that all use one adapter (the common case) run it as the active adapter: PEFT's
        mixed-batch path gathers and scatters rows in every LoRA layer, which measured up to 1.8x
        slower per step with a single adapter, so it is used only when the rows really differ.
        """
        names = set(adapters)
        if not self.adapters:
            yield {}
        elif len(names) > 1:
            assert self.mixed, "a grouped batch holds one adapter"
            yield {"adapter_names": [name or BASE for name in adapters]}
        elif names == {None}:
            with self.model.disable_adapter():
                yield {}
        else:
            (name,) = names
            if name != self._active:
                self.model.set_adapter(name)
                self._active = name
            yield {}


def _mixable(config: Any) -> bool:
    from peft import LoraConfig

    return isinstance(config, LoraConfig) and not getattr(config, "use_dora", False)
