"""Peak memory and time per step of a run, predicted from its config before any weight is read.

The model's shape comes from its config.json (or a GGUF file's metadata): the model is built on
PyTorch's meta device, which has every parameter's shape and no data. Memory is the sum of parts,
each a formula in that shape and the run's settings:

- runtime: the Python process with torch, transformers, peft and the data stack imported (CPU only;
  on a GPU the peak is counted by the allocator and this part is 0),
- weights: the base model as stored (fp32; bf16 for frozen linear weights of a bf16 LoRA run; 4 or
  8 bits plus block scales for QLoRA's linear layers),
- trainable: parameters the adapter adds (LoRA A/B, DoRA magnitudes, modules_to_save copies),
- gradients: 4 bytes per trainable parameter (BAdam: one decoder layer's, and the largest other
  gradient, which exists until the backward drops it),
- optimizer: each optimizer's state, from the shapes it keeps (see `optimizer_state_bytes`),
- activations: what one forward keeps for its backward pass, per token and decoder layer, times
  the share the backward adds on top in peak RSS,
- logits: the LM head's fp32 logits and their gradient for one chunk of labelled tokens,
- workspace: fp32 temporaries of the optimizer step for its largest tensor (8-bit AdamW on CPU),
- allocator: memory held beyond the parts above (a share of activations; for full tuning a fitted
  share of the weights),
- loading: how far the load-time peak (the checkpoint's mapped pages beside the weights materialised
  in fp32, and QLoRA's quantized copy) exceeds the training peak, when it does.

The per-token coefficients were counted with `torch.autograd.graph.saved_tensors_hooks` on
Llama-shaped layers (SmolLM2's dimensions); the runtime, workspace, allocator, loading and peak factors
were fitted to whole-process peak RSS measured by `bench/estimate_vs_measured.py` (docs/estimate.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FP32 = 4
RUNTIME_BYTES_CPU = 435 * 2**20
"""The `tunesmith train` process before the model: interpreter, torch, transformers, peft, datasets,
tokenizer and the tokenized data (fitted to measured peak RSS)."""
LOGIT_COPIES = 3.0
"""fp32 logits of one chunk, their log-softmax and their gradient are alive at once in the backward."""
ACTIVATION_PEAK_FACTOR = {"full": 0.56, "freeze": 0.56, "lora": 1.74, "qlora": 1.74}
"""Peak RSS per token over the saved-tensor bytes per token, fitted to measured runs: LoRA at 256 and
2048 tokens per step grew 1.74x its saved bytes (the backward's activation gradients and free lists
on top); full tuning at 256 and 1024 tokens grew 0.56x (its peak falls where part of the activations
is already freed for the gradients). The cause of the difference is not pinned down."""
FULL_TUNING_EXTRA = 0.375
"""Full tuning's peak held a further 0.375x the fp32 weights that no part above accounts for
(fitted: 192 MiB on the default model at every optimizer)."""
DORA_RSS_SHARE = 0.79
"""Of the extra tensors DoRA saves (counted by hooks), this share shows in peak RSS (fitted, one run)."""
QLORA_LOAD_FP32_COPIES = 1.5
"""Loading a full-precision checkpoint quantized: beside its mapped pages, 1.5 fp32 copies of the
weights exist at the peak before they are quantized (fitted, one run)."""
ALLOCATOR_SLACK = 0.05
"""Freed activations and temporaries are not all handed back to the OS at once (CPU) or are held by
the caching allocator (GPU): a share of the activations stays counted (adapters; full tuning uses
`FULL_TUNING_EXTRA` instead)."""
BNB_4BIT_SCALES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}
"""Bytes per weight of bitsandbytes' 4-bit block scales (block 64), with and without double quant."""
ADAM8_MIN_SIZE = 4096
"""bitsandbytes keeps 32-bit state for tensors under this many elements (`min_8bit_size`)."""
STEP_WORKSPACE_CPU = {
    "adamw_8bit": 4.5,
    "paged_adamw_8bit": 4.5,
    "galore": 1.5,
    "apollo": 1.5,
    "adam_mini": 1.0,
}
"""fp32 copies of one tensor an optimizer step makes on CPU, tensor by tensor, so the largest tensor
(the embedding) sets the peak (fitted to measured RSS): bitsandbytes' CPU kernel de-quantizes both
8-bit moments, copies the gradient and builds the denominator in fp32; GaLore's and APOLLO's Adam
step on the tensors they do not project builds `exp_avg / (sqrt(exp_avg_sq) + eps)` out of place, and
Adam-mini's update one copy."""


class EstimateError(ValueError):
    """The estimate cannot be made for this config (names the key and what to do)."""


# --------------------------------------------------------------------------------------------
# The model's shape, from its config alone


@dataclass(frozen=True)
class Tensor:
    """One parameter: shape and where it sits (for optimizers that treat kinds differently)."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "embedding" (embeddings and LM head), "hidden" (2-D inside the decoder), "other"
    layer: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model; built without its weights."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int | None
    params: tuple[Tensor, ...]
    stored_bytes_per_param: int
    linears: tuple[tuple[str, int, int, int | None], ...]  # (name, out, in, layer) of every nn.Linear
    config: Any = field(repr=False, compare=False, default=None)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.params)

    def layer_params(self, layer: int = 0) -> int:
        return sum(t.numel for t in self.params if t.layer == layer)


def read_model_config(spec: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of `model:` (default, a directory, a .gguf, a cached hub id); no weights read."""
    from transformers import AutoConfig

    from tunesmith.models.gguf_cache import READY_MARKER, gguf_cache_dir

    if spec == "default":
        from tunesmith.models.default_model import DEFAULT_MODEL_NAME, default_gguf_path
        from tunesmith.models.gguf_cache import cache_root

        converted = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1"
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        return _gguf_config(default_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EstimateError(f"model: GGUF file not found: {path}")
        converted = gguf_cache_dir(path)
        if (converted / READY_MARKER).is_file():
            return AutoConfig.from_pretrained(converted)
        return _gguf_config(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EstimateError(
                f"model: {path} has no config.json; the estimate reads the model's shape from it"
            )
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    from tunesmith.models.load import resolve_model_dir

    return AutoConfig.from_pretrained(resolve_model_dir(spec), trust_remote_code=trust_remote_code)


def _gguf_config(path: Path) -> Any:
    """A GGUF file's model config from its metadata (transformers reads the header, not the tensors)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def model_shape(config: Any) -> ModelShape:
    """Parameter shapes from a meta-device model: exact for any architecture, no memory used."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    head = model.get_output_embeddings()
    if head is not None:
        embedding_ids |= {id(p) for p in head.parameters()}
    tensors = []
    for name, p in model.named_parameters():  # tied weights are listed once
        layer = _layer_index(name)
        kind = (
            "embedding"
            if id(p) in embedding_ids
            else "hidden"
            if p.ndim == 2 and layer is not None
            else "other"
        )
        tensors.append(Tensor(name, tuple(p.shape), kind, layer))
    linears = tuple(
        (name, m.out_features, m.in_features, _layer_index(name))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return ModelShape(
        model_type=str(config.model_type),
        vocab=int(text.vocab_size),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        max_positions=getattr(text, "max_position_embeddings", None),
        params=tuple(tensors),
        stored_bytes_per_param=_stored_bytes(config),
        linears=linears,
        config=config,
    )


def _stored_bytes(config: Any) -> int:
    """Bytes per parameter of the checkpoint on disk (its config's dtype; fp32 when it names none)."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if any(half in dtype for half in ("float16", "bfloat16")) else 4


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(name: str) -> int | None:
    found = _LAYER.search(f".{name}")
    return int(found.group(1)) if found else None


# --------------------------------------------------------------------------------------------
# The run's settings that matter for memory


@dataclass(frozen=True)
class Plan:
    """The settings of a run the estimate depends on; `--budget` varies these."""

    adapter: str  # lora | qlora | full | freeze
    optimizer: str
    batch_size: int
    seq_len: int
    precision: str  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    lean_activations: bool = False
    loss_chunk_size: int = 1024
    r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    bits: int = 4
    double_quant: bool = True
    trainable_layers: int | None = 2
    trainable_modules: tuple[str, ...] = ()
    galore_rank: int = 128
    apollo_rank: int = 256
    badam_always_active: tuple[str, ...] = ()
    rows_per_sample: int = 1  # preference methods: chosen and rejected in one forward
    device: str = "cpu"

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch: packed rows are filled to seq_len (padded ones are at most that)."""
        return self.batch_size * self.seq_len * self.rows_per_sample

    @property
    def describe(self) -> str:
        name = self.adapter if self.adapter != "qlora" else f"qlora-{self.bits}bit"
        return f"{name}{' (dora)' if self.dora else ''} + {self.optimizer}"


PREFERENCE_METHODS = ("dpo", "simpo", "orpo", "kto", "reward")


def plan_from_config(cfg: Any, device: str | None = None) -> Plan:
    """The `Plan` of a `RunConfig`; `precision: auto` is resolved as the run would resolve it."""
    from tunesmith.training.precision import choose_precision

    device = device or _device_type()
    if cfg.train.precision == "auto" and device != _device_type():
        precision = "bf16" if device == "cuda" else "fp32"  # another machine's: its probe cannot run here
    else:
        precision = choose_precision(cfg.train.precision, device).precision
    adapter = cfg.adapter
    lora = adapter.type in ("lora", "qlora")
    targets = adapter.targets if lora else "all-linear"
    return Plan(
        adapter=adapter.type,
        optimizer=cfg.optim.name,
        batch_size=cfg.train.batch_size,
        seq_len=cfg.data.seq_len,
        precision=precision,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        lean_activations=cfg.train.lean_activations,
        loss_chunk_size=cfg.train.loss_chunk_size,
        r=adapter.r if lora else 16,
        targets=targets if isinstance(targets, str) else tuple(targets),
        dora=bool(lora and adapter.dora),
        modules_to_save=tuple(adapter.modules_to_save) if lora else (),
        bits=getattr(adapter, "bits", 4),
        double_quant=getattr(adapter, "double_quant", True),
        trainable_layers=getattr(adapter, "trainable_layers", None),
        trainable_modules=tuple(getattr(adapter, "trainable_modules", ())),
        galore_rank=cfg.optim.galore.rank,
        apollo_rank=cfg.optim.apollo.rank,
        badam_always_active=tuple(cfg.optim.badam.always_active),
        rows_per_sample=2 if cfg.method in PREFERENCE_METHODS and cfg.method != "kto" else 1,
        device=device,
    )


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Memory


def _targeted(shape: ModelShape, plan: Plan) -> list[tuple[str, int, int, int | None]]:
    """The linear layers LoRA adapts (peft's all-linear leaves out the LM head)."""
    decoder = [lin for lin in shape.linears if lin[3] is not None]
    if plan.targets == "all-linear":
        return decoder
    if isinstance(plan.targets, str):
        pattern = re.compile(plan.targets)
        return [lin for lin in shape.linears if pattern.fullmatch(lin[0])]
    wanted = set(plan.targets)
    return [lin for lin in shape.linears if lin[0].rsplit(".", 1)[-1] in wanted or lin[0] in wanted]


def trainable_tensors(shape: ModelShape, plan: Plan) -> list[Tensor]:
    """The tensors the optimizer sees (their shapes decide its state)."""
    if plan.adapter == "full":
        return list(shape.params)
    if plan.adapter == "freeze":
        first = shape.layers - (plan.trainable_layers or 0)
        return [
            t
            for t in shape.params
            if (t.layer is not None and t.layer >= first) or any(s in t.name for s in plan.trainable_modules)
        ]
    tensors = []
    for name, out, inp, layer in _targeted(shape, plan):
        tensors.append(Tensor(f"{name}.lora_A", (plan.r, inp), "other", layer))
        tensors.append(Tensor(f"{name}.lora_B", (out, plan.r), "other", layer))
        if plan.dora:
            tensors.append(Tensor(f"{name}.magnitude", (out,), "other", layer))
    for wanted in plan.modules_to_save:
        tensors += [t for t in shape.params if wanted in t.name]
    return tensors


def weight_bytes(shape: ModelShape, plan: Plan) -> int:
    """The base model as it sits in memory during training."""
    linear_weights = {f"{name}.weight" for name, _, _, layer in shape.linears if layer is not None}
    total = 0.0
    for t in shape.params:
        decoder_linear = t.name in linear_weights
        if plan.adapter == "qlora" and decoder_linear:
            if plan.bits == 4:
                total += t.numel * (0.5 + BNB_4BIT_SCALES[plan.double_quant])
            else:
                total += t.numel + t.shape[0] * FP32  # int8 rows and one fp32 scale per row
        elif plan.adapter == "lora" and plan.precision == "bf16" and decoder_linear:
            total += t.numel * 2  # frozen linear weights stored in bf16
        else:
            total += t.numel * FP32
    return int(total)


def optimizer_state_bytes(tensors: list[Tensor], plan: Plan, shape: ModelShape) -> int:
    """Bytes of optimizer state after the first step, from each optimizer's own bookkeeping.

    adamw/paged: 2 fp32 moments; adamw_8bit: 2 bytes per element (+ block scales) for tensors of at
    least 4096 elements, else fp32; lion: 1 moment; muon: 1 momentum for hidden matrices, AdamW for the
    rest; adafactor: row + column second moments of matrices, a full one of vectors; galore/apollo:
    moments of the rank-r projection plus the projection of each hidden matrix whose shorter side is
    above r, AdamW for the rest; adam_mini: one fp32 moment per element (the second moment per head
    or neuron is negligible); badam: AdamW for one decoder layer (the largest) plus `always_active`.
    """
    name = plan.optimizer
    if name == "badam":
        largest = max(range(shape.layers), key=lambda i: sum(t.numel for t in tensors if t.layer == i))
        active = [
            t for t in tensors if t.layer == largest or any(s in t.name for s in plan.badam_always_active)
        ]
        return 8 * sum(t.numel for t in active)
    total = 0.0
    for t in tensors:
        n = t.numel
        if name in ("adamw", "paged_adamw"):
            total += 8 * n
        elif name in ("adamw_8bit", "paged_adamw_8bit"):
            total += (2 + 8 / 2048) * n if n >= ADAM8_MIN_SIZE else 8 * n
        elif name == "lion":
            total += 4 * n
        elif name == "muon":
            total += (4 if t.kind == "hidden" else 8) * n
        elif name == "adafactor":
            total += 4 * (t.shape[0] + t.shape[1]) if len(t.shape) == 2 else 4 * n
        elif name in ("galore", "apollo"):
            rank = plan.galore_rank if name == "galore" else plan.apollo_rank
            if t.kind == "hidden" and len(t.shape) == 2 and min(t.shape) > rank:
                total += 8 * rank * max(t.shape) + 4 * rank * min(t.shape)
            else:
                total += 8 * n
        elif name == "adam_mini":
            total += 4 * n
        else:
            raise EstimateError(f"optim.name {name!r} has no memory model in the estimate")
    return int(total)


def activation_bytes_per_token_layer(shape: ModelShape, plan: Plan) -> float:
    """Bytes one decoder layer keeps for the backward, per token (counted with saved-tensor hooks).

    Full tuning of a Llama-shaped layer keeps 7d + 4f + 2q + 2kv fp32 values per token (norm inputs
    and outputs, the attention's q/k/v/output, the MLP's four f-wide tensors); with the norms frozen
    (LoRA) two d-wide tensors fewer, plus r per adapted linear; DoRA keeps each adapted output twice
    more. Gradient checkpointing keeps only the layer input.
    """
    d, f = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if plan.gradient_checkpointing:
        return FP32 * d
    values = 4 * f + 2 * q + 2 * kv + (7 if plan.adapter == "full" else 5) * d
    if plan.lean_activations:
        values -= f  # the lean SwiGLU recomputes silu(gate) instead of keeping it
    if plan.adapter in ("lora", "qlora"):
        adapted = [lin for lin in _targeted(shape, plan) if lin[3] == 0]
        values += plan.r * len(adapted)
        if plan.dora:
            values += 2.4 * sum(out for _, out, _, _ in adapted)
    scale = 0.6 if plan.precision in ("bf16", "fp16") else 1.0  # matmul outputs in half precision
    return FP32 * values * scale


def activation_bytes(shape: ModelShape, plan: Plan) -> int:
    """Saved tensors of all layers, the embeddings and the final norm (one recomputed layer under
    checkpointing), times the backward's share on top (`ACTIVATION_PEAK_FACTOR`); DoRA's extra."""
    tokens = plan.tokens
    plain = dataclasses.replace(plan, dora=False)
    per_layer = activation_bytes_per_token_layer(shape, plain)
    saved = per_layer * tokens * shape.layers + 3 * FP32 * shape.hidden * tokens
    if plan.gradient_checkpointing:  # the backward recomputes one layer at a time
        saved += (
            activation_bytes_per_token_layer(shape, dataclasses.replace(plain, gradient_checkpointing=False))
            * tokens
        )
    total = ACTIVATION_PEAK_FACTOR[plan.adapter] * saved
    if plan.adapter in ("full", "freeze"):  # the fitted factor is below 1: never below the saved bytes
        total = max(total, saved - FP32 * sum(t.numel for t in trainable_tensors(shape, plan)))
    if plan.dora and plan.adapter in ("lora", "qlora"):
        extra = (activation_bytes_per_token_layer(shape, plan) - per_layer) * tokens * shape.layers
        adapted = sum(out * inp for _, out, inp, layer in _targeted(shape, plan) if layer is not None)
        extra += 0.51 * FP32 * adapted  # DoRA also keeps about half of each adapted weight
        total += DORA_RSS_SHARE * extra
    return int(total)


def logits_bytes(shape: ModelShape, plan: Plan) -> int:
    """One chunk of labelled tokens through the LM head in fp32 (logits, log-softmax, gradient)."""
    chunk = min(plan.tokens, plan.loss_chunk_size)
    return int(LOGIT_COPIES * chunk * shape.vocab * FP32)


def signed_size(count: int) -> str:
    from tunesmith.sizes import format_size

    return f"-{format_size(-count)}" if count < 0 else format_size(count)


def loading_peak_bytes(shape: ModelShape, plan: Plan, weights: int) -> int:
    """The process while the weights load (CPU): the checkpoint's mapped pages, every weight
    materialised in fp32, and (QLoRA) the quantized copy made from them."""
    if plan.device != "cpu":
        return 0
    stored = shape.stored_bytes_per_param * shape.total_params
    copies = QLORA_LOAD_FP32_COPIES if plan.adapter == "qlora" else 1.0
    materialised = int(copies * FP32 * shape.total_params)
    quantized = weights if plan.adapter == "qlora" else 0
    return RUNTIME_BYTES_CPU + stored + materialised + quantized


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory (bytes, by part) and time per optimizer step."""

    plan: Plan
    parts: dict[str, int]
    trainable_params: int
    total_params: int
    step_seconds: float | None = None
    calibration: dict[str, Any] | None = None

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    def summary_line(self) -> str:
        from tunesmith.sizes import format_size

        parts = ", ".join(f"{k} {signed_size(v)}" for k, v in self.parts.items() if v)
        time_text = f"; about {self.step_seconds:.1f} s per step" if self.step_seconds else ""
        where = "process peak RSS" if self.plan.device == "cpu" else "peak allocated on the GPU"
        return (
            f"estimate: {format_size(self.peak_bytes)} {where} ({self.plan.describe}, batch "
            f"{self.plan.batch_size} x seq {self.plan.seq_len}, {self.plan.precision}: {parts}){time_text}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "parts": self.parts,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "step_seconds": self.step_seconds,
            "calibration": self.calibration,
            "plan": dataclasses.asdict(self.plan),
        }


def estimate_plan(shape: ModelShape, plan: Plan) -> Estimate:
    """The memory estimate of `plan` on `shape` (pure arithmetic: fast enough to search over)."""
    tensors = trainable_tensors(shape, plan)
    trainable = sum(t.numel for t in tensors)
    if plan.optimizer == "badam":  # inactive layers' gradients are dropped as the backward makes them
        largest = max(shape.layer_params(i) for i in range(shape.layers))
        always = [
            t for t in tensors if t.layer is None and any(s in t.name for s in plan.badam_always_active)
        ]
        dropped = max((t.numel for t in tensors if t not in always), default=0)  # made, then dropped
        grads = FP32 * (largest + sum(t.numel for t in always) + dropped)
    else:
        grads = FP32 * trainable
    added = 0 if plan.adapter in ("full", "freeze") else FP32 * trainable
    activations = activation_bytes(shape, plan)
    parts = {
        "runtime": RUNTIME_BYTES_CPU if plan.device == "cpu" else 0,
        "weights": weight_bytes(shape, plan),
        "trainable": added,
        "gradients": grads,
        "optimizer": optimizer_state_bytes(tensors, plan, shape),
        "activations": activations,
        "logits": logits_bytes(shape, plan),
    }
    largest = max((t.numel for t in tensors), default=0)
    copies = STEP_WORKSPACE_CPU.get(plan.optimizer, 0.0) if plan.device == "cpu" else 0.0
    parts["workspace"] = int(copies * FP32 * largest)
    slack = FULL_TUNING_EXTRA * parts["weights"] if plan.adapter == "full" else ALLOCATOR_SLACK * activations
    parts["allocator"] = int(slack)
    parts["loading"] = max(0, loading_peak_bytes(shape, plan, parts["weights"]) - sum(parts.values()))
    return Estimate(plan=plan, parts=parts, trainable_params=trainable, total_params=shape.total_params)


# --------------------------------------------------------------------------------------------
# Time: one decoder layer with random weights, timed


def calibrate_step_seconds(shape: ModelShape, plan: Plan, max_tokens: int = 1024) -> dict[str, Any]:
    """Forward + backward of one random decoder layer on this machine, scaled to the whole model.

    The layer is built from the model's own config (one layer, a small vocabulary) with the run's
    adapter kind, and timed on batch x seq_len tokens (at most `max_tokens`, then scaled linearly).
    The LM head's matmuls are added at the layer's measured FLOP rate.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = shape.config.__class__.from_dict(shape.config.to_dict())
    text = getattr(config, "text_config", None) or config
    text.num_hidden_layers = 1
    text.vocab_size = 256
    if hasattr(text, "layer_types") and text.layer_types:
        text.layer_types = text.layer_types[:1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if plan.adapter in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=plan.r, lora_alpha=plan.r, target_modules="all-linear", use_dora=plan.dora)
        )
    model.train()
    rows = max(
        1, min(plan.batch_size * plan.rows_per_sample, max_tokens // max(1, min(plan.seq_len, max_tokens)))
    )
    width = min(plan.seq_len, max_tokens)
    ids = torch.randint(0, 256, (rows, width))
    layer_kind = "bf16" if plan.precision == "bf16" else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=layer_kind == "bf16")

    def once() -> float:
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    once()  # warm-up: kernels, allocator
    measured = min(once() for _ in range(2))
    tokens_timed = rows * width
    scale = plan.tokens / tokens_timed
    linear_params = sum(out * inp for _, out, inp, layer in shape.linears if layer == 0)
    factor = 6 if plan.adapter == "full" else 4  # no weight gradients for frozen matmuls
    rate = factor * tokens_timed * linear_params / measured  # FLOP/s this layer reached
    head_flops = factor * plan.tokens * shape.hidden * shape.vocab
    layer_seconds = measured * scale * (4 / 3 if plan.gradient_checkpointing else 1)
    step = layer_seconds * shape.layers + head_flops / rate
    return {
        "layer_seconds": round(measured, 4),
        "tokens_timed": tokens_timed,
        "gflops": round(rate / 1e9, 1),
        "step_seconds": step,
    }


# --------------------------------------------------------------------------------------------
# Entry points


@functools.lru_cache(maxsize=8)
def shape_of(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """`model_shape` of a `model:` spec, kept: `tunesmith train` asks twice (summary and warning)."""
    return model_shape(read_model_config(spec, trust_remote_code))


def estimate(cfg: Any, calibrate: bool = True, device: str | None = None) -> Estimate:
    """Estimate of a `RunConfig`: memory always, time per step when `calibrate`."""
    shape = shape_of(cfg.model, cfg.trust_remote_code)
    plan = plan_from_config(cfg, device)
    result = estimate_plan(shape, plan)
    if calibrate:
        timing = calibrate_step_seconds(shape, plan)
        result = dataclasses.replace(
            result, step_seconds=timing["step_seconds"] * cfg.train.grad_accum, calibration=timing
        )
    return result


def estimate_summary_line(cfg: Any) -> str:
    """One line for the first lines of `tunesmith train` (memory only: no calibration run)."""
    return estimate(cfg, calibrate=False).summary_line()


def memory_warning(cfg: Any, available: int | None = None) -> str | None:
    """A warning when this machine's free memory (RAM on CPU, GPU memory on CUDA) is below the estimate."""
    from tunesmith.sizes import format_size

    result = estimate(cfg, calibrate=False)
    free = available if available is not None else free_memory_bytes(result.plan.device)
    if free is None or free >= result.peak_bytes:
        return None
    where = "GPU memory" if result.plan.device == "cuda" else "memory"
    return (
        f"warning: the run is estimated to need {format_size(result.peak_bytes)} but only "
        f"{format_size(free)} of {where} is free; lower train.batch_size or data.seq_len, set "
        "train.gradient_checkpointing: true, or see `tunesmith estimate CONFIG --budget SIZE`"
    )


def free_memory_bytes(device: str) -> int | None:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------
# What fits a budget

CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("full", ("adamw", "adamw_8bit", "adam_mini", "galore", "apollo", "adafactor", "badam")),
    ("lora", ("adamw", "adamw_8bit")),
    ("qlora", ("adamw", "adamw_8bit")),
)


@dataclass(frozen=True)
class BudgetAnswer:
    budget: int
    fits: bool
    peak_bytes: int
    max_batch_size: int | None
    max_seq_len: int | None
    choices: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def largest_fitting(fits: Any, low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for a monotone `fits`; None if not even low fits."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def what_fits(shape: ModelShape, plan: Plan, budget: int) -> BudgetAnswer:
    """The largest batch (at this seq_len) and seq_len (at this batch) under `budget`, and which
    adapter + optimizer combinations fit at this batch and seq_len."""
    peak = estimate_plan(shape, plan).peak_bytes

    def under(**change: Any) -> bool:
        return estimate_plan(shape, dataclasses.replace(plan, **change)).peak_bytes <= budget

    max_batch = largest_fitting(lambda b: under(batch_size=b), 1, 1 << 16)
    top_seq = shape.max_positions or 1 << 20
    max_seq = largest_fitting(lambda s: under(seq_len=s), 1, top_seq)
    choices = []
    for adapter, optimizers in CHOICES:
        for optimizer in optimizers:
            variant = dataclasses.replace(plan, adapter=adapter, optimizer=optimizer, dora=False)
            if adapter == "qlora":
                variant = dataclasses.replace(variant, bits=4)
            result = estimate_plan(shape, variant)
            choices.append(
                {
                    "adapter": adapter if adapter != "qlora" else "qlora-4bit",
                    "optimizer": optimizer,
                    "peak_bytes": result.peak_bytes,
                    "fits": result.peak_bytes <= budget,
                }
            )
    return BudgetAnswer(budget, peak <= budget, peak, max_batch, max_seq, choices)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False)
