"""The optimizer (`optim:` section) and the lr schedule (`train.scheduler`) of a run.

`make_optimizer(model, cfg)` and `make_scheduler(optimizer, cfg.train, total_steps)` build what the
loop steps. The default `optim:` is AdamW, fused where the device supports it, betas (0.9, 0.999),
eps 1e-8, weight decay on matrices only: the optimizer `build_optimizer` has always built.

Where each algorithm comes from: AdamW and Adafactor from torch; AdamW 8-bit, paged AdamW 8-bit
and Lion from bitsandbytes; Muon from torch (hidden matrices) chained with AdamW (the rest);
Adam-mini from the `adam-mini` package; GaLore, APOLLO and BAdam from training/optimizers/ (the
packages' projector objects cannot be loaded with `weights_only=True`, so a run could not resume).

Per-group lr factors (LoRA+: B matrices at lr * lr_ratio) are a group's `lr_scale`: the schedule
multiplies it in, so every group shares train.lr and a resume that changes train.lr keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunesmith.config.load import ConfigError
from tunesmith.config.schema import OptimConfig, RunConfig, TrainConfig

ADAM_BETAS = (0.9, 0.999)
LION_BETAS = (0.9, 0.99)
EPS = 1e-8

Named = Sequence[tuple[str, torch.nn.Parameter]]


def _adamw(groups: list[dict[str, Any]], lr: float, betas: Any, eps: float, fused: Any, foreach: Any) -> Any:
    """torch AdamW: fused unless told otherwise, falling back where the device or dtype has no kernel."""
    if fused is None and not foreach:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=foreach)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """The default optimizer from bare parameters (kept for callers without a config)."""
    named = [(str(i), p) for i, p in enumerate(params) if p.requires_grad]
    return _adamw(decay_groups(named, weight_decay), lr, ADAM_BETAS, EPS, None, None)


def decay_groups(named: Named, weight_decay: float, lr_ratio: float | None = None) -> list[dict[str, Any]]:
    """Matrices decayed, norms and biases not; with LoRA+ the B matrices (and 1-D parameters, as peft's
    `create_loraplus_optimizer` does) in groups of their own with `lr_scale` lr_ratio."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]  # norms and biases are not decayed
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if lr_ratio is not None:
        fast = {id(p) for name, p in named if "lora_B" in name or p.ndim == 1}
        groups = [
            {"params": [p for p in g["params"] if id(p) not in fast], "weight_decay": g["weight_decay"]}
            for g in groups
        ] + [
            {
                "params": [p for p in g["params"] if id(p) in fast],
                "weight_decay": g["weight_decay"],
                "lr_scale": lr_ratio,
            }
            for g in groups
        ]
    return [g for g in groups if g["params"]]


def _embedding_ids(model: torch.nn.Module) -> set[int]:
    """Parameters of embeddings and of the LM head: Muon, GaLore and APOLLO leave these to AdamW."""
    ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for module in model.modules():
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output):
            head = get_output()
            if isinstance(head, torch.nn.Module):
                ids |= {id(p) for p in head.parameters()}
    return ids


def _hidden_matrices(model: torch.nn.Module, named: Named) -> set[int]:
    embeddings = _embedding_ids(model)
    return {id(p) for name, p in named if p.ndim == 2 and id(p) not in embeddings and "lm_head" not in name}


def _split(groups: list[dict[str, Any]], chosen: set[int], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Each group split in two: its chosen parameters (with `extra` keys) first, then the others."""
    out = []
    for g in groups:
        keys = {k: v for k, v in g.items() if k != "params"}
        picked = [p for p in g["params"] if id(p) in chosen]
        others = [p for p in g["params"] if id(p) not in chosen]
        out += [{"params": picked, **keys, **extra}, {"params": others, **keys}]
    return [g for g in out if g["params"]]


def _model_config(model: torch.nn.Module) -> Any:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    raise ConfigError("optim.name adam_mini needs a transformers model (hidden_size, num_attention_heads)")


def _needs_full(cfg: RunConfig) -> None:
    if cfg.adapter.type != "full":
        raise ConfigError(
            f"optim.name {cfg.optim.name} is for full fine-tuning; set adapter.type: full "
            f"(or use optim.name adamw with adapter {cfg.adapter.type})"
        )


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optim` names, over the model's trainable parameters in their usual order."""
    o: OptimConfig = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr = cfg.train.lr
    wd = o.weight_decay if o.weight_decay is not None else cfg.train.weight_decay
    betas = tuple(o.betas) if o.betas is not None else (LION_BETAS if o.name == "lion" else ADAM_BETAS)
    eps = o.eps if o.eps is not None else EPS
    groups = decay_groups(named, wd, getattr(cfg.adapter, "lr_ratio", None))
    name = o.name
    if name == "adamw":
        return _adamw(groups, lr, betas, eps, o.fused, o.foreach)
    if name in ("adamw_8bit", "paged_adamw_8bit", "lion"):
        import bitsandbytes as bnb

        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}.get(
            name, bnb.optim.Lion
        )
        kwargs = {} if name == "lion" else {"eps": eps}
        return cls(groups, lr=lr, betas=betas, **kwargs)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr, eps=(o.eps, 1e-3), foreach=o.foreach)
    if name == "muon":
        return _muon(model, named, groups, lr, betas, eps, o)
    if name in ("galore", "apollo"):
        from tunesmith.training.optimizers import Apollo, GaLoreAdamW

        options = o.galore if name == "galore" else o.apollo
        extra = options.model_dump()
        extra.setdefault("proj_type", "std")
        cls_lowrank = GaLoreAdamW if name == "galore" else Apollo
        return cls_lowrank(_split(groups, _hidden_matrices(model, named), extra), lr=lr, betas=betas, eps=eps)
    if name == "adam_mini":
        _needs_full(cfg)
        from adam_mini import Adam_mini

        config = _model_config(model)
        heads = config.num_attention_heads
        return Adam_mini(
            named_parameters=named,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=wd,
            dim=config.hidden_size,
            n_heads=heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            verbose=False,
        )
    if name == "badam":
        _needs_full(cfg)
        return _badam(named, groups, lr, betas, eps, o, cfg.train.seed)
    raise ConfigError(f"optim.name {name!r} is not known")  # the schema's Literal keeps this unreachable


def _muon(
    model: torch.nn.Module,
    named: Named,
    groups: list[dict[str, Any]],
    lr: float,
    betas: Any,
    eps: float,
    o: Any,
) -> torch.optim.Optimizer:
    from tunesmith.training.optimizers import OptimizerChain

    hidden = _hidden_matrices(model, named)
    muon_groups = [{**g, "params": [p for p in g["params"] if id(p) in hidden]} for g in groups]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
    muon_groups = [g for g in muon_groups if g["params"]]
    rest = [g for g in rest if g["params"]]
    if not muon_groups:
        raise ConfigError("optim.name muon found no 2-D hidden weights to train; use optim.name adamw")
    m = o.muon
    muon = torch.optim.Muon(
        muon_groups,
        lr=lr,
        weight_decay=0.0,  # each group's own weight_decay is used
        momentum=m.momentum,
        nesterov=m.nesterov,
        ns_steps=m.ns_steps,
        eps=1e-7,
        adjust_lr_fn=None if m.adjust_lr == "original" else m.adjust_lr,
    )
    parts: list[torch.optim.Optimizer] = [muon]
    if rest:
        parts.append(_adamw(rest, lr, betas, eps, o.fused, o.foreach))
    return OptimizerChain(parts)


def _badam(
    named: Named, groups: list[dict[str, Any]], lr: float, betas: Any, eps: float, o: Any, seed: int
) -> torch.optim.Optimizer:
    from tunesmith.training.optimizers import BAdam
    from tunesmith.training.optimizers.badam import layer_blocks

    blocks, _ = layer_blocks(named)
    b = o.badam
    always = [p for name, p in named if any(s in name for s in b.always_active)]
    if not blocks:
        raise ConfigError(
            "optim.name badam found no decoder layers (parameters named layers.N.) to use as blocks"
        )

    def build(**kernel: Any) -> BAdam:
        return BAdam(
            groups,
            blocks=[[named[i][1] for i in block] for block in blocks],
            always_active=always,
            switch_every=b.switch_every,
            switch_mode=b.switch_mode,
            seed=seed,
            lr=lr,
            betas=betas,
            eps=eps,
            **kernel,
        )

    if o.fused is None and not o.foreach:
        try:
            return build(fused=True)
        except (RuntimeError, TypeError, ValueError):  # fused unsupported for this device/dtype
            pass
    return build(fused=o.fused, foreach=o.foreach)


# -- lr schedules ----------------------------------------------------------------------------------


class WarmupSchedule:
    """A picklable lr multiplier: linear warmup, then the named schedule down to `min_lr_ratio`.

    Warmup: (step + 1) / (warmup + 1). After it, with progress p in [0, 1] over the remaining steps:
    cosine m + (1 - m) (1 + cos(pi p)) / 2; linear m + (1 - m) (1 - p); cosine_with_restarts the cosine
    of (num_cycles p) mod 1; inverse_sqrt max(m, sqrt(w / max(step, w))) with w = max(warmup, 1);
    wsd 1 until the last `decay_steps`, then m + (1 - m) f(q) over them (f: 1 - q, cosine, 1 - sqrt q);
    constant 1. `scale` multiplies the whole curve (a group's lr_scale).
    """

    def __init__(
        self,
        kind: str,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        num_cycles: int = 1,
        decay_steps: int = 0,
        decay_shape: str = "linear",
        scale: float = 1.0,
    ) -> None:
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, max(total_steps, 1)
        self.min_lr_ratio, self.num_cycles, self.scale = min_lr_ratio, num_cycles, scale
        self.decay_steps, self.decay_shape = decay_steps, decay_shape

    def __call__(self, step: int) -> float:
        return self.scale * self._multiplier(step)

    def _multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        m = getattr(self, "min_lr_ratio", 0.0)  # schedules pickled before these fields existed
        kind = self.kind
        if kind == "constant":
            return 1.0
        if kind == "inverse_sqrt":
            w = max(self.warmup_steps, 1)
            return max(m, math.sqrt(w / max(step, w)))
        if kind == "wsd":
            decay_start = max(self.total_steps - self.decay_steps, self.warmup_steps)
            if step < decay_start:
                return 1.0
            q = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
            shape = {
                "linear": 1.0 - q,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * q)),
                "1-sqrt": 1.0 - math.sqrt(q),
            }
            return m + (1.0 - m) * shape[self.decay_shape]
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if kind == "linear":
            return m + (1.0 - m) * (1.0 - progress)
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return m
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0)))
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """train.warmup_steps when set, else ceil(warmup_ratio x total steps)."""
    if train.warmup_steps is not None:
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> LambdaLR:
    """One multiplier per param group (its lr_scale folded in), all on the base lr train.lr."""
    warmup = warmup_steps(train, total_steps)
    lambdas = []
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group.setdefault("initial_lr", train.lr)
        lambdas.append(
            WarmupSchedule(
                train.scheduler,
                warmup,
                total_steps,
                min_lr_ratio=train.min_lr_ratio,
                num_cycles=train.num_cycles,
                decay_steps=math.ceil(train.wsd_decay_ratio * total_steps),
                decay_shape=train.wsd_decay_shape,
                scale=scale,
            )
        )
    return LambdaLR(optimizer, lambdas)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float, total_steps: int
) -> LambdaLR:
    """The schedule from its three historic arguments (kept for callers without a config)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, WarmupSchedule(kind, warmup, total_steps))
