"""The run configuration: one frozen pydantic model built from sections.

Every field has a default or is required; nothing is read from a dict that may lack a key.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tunesmith.config.distributed import DistributedConfig
from tunesmith.config.section import Section

NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


LoraInit = Literal["default", "gaussian", "pissa", "olora"]


class LoraAdapter(Section):
    """LoRA through peft; every option maps to one `peft.LoraConfig` field, so the saved adapter is peft's own."""

    type: Literal["lora"] = "lora"
    r: PositiveInt = 16
    alpha: PositiveFloat = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: str | list[str] = Field(
        default="all-linear",
        description="'all-linear', a list of module names (q_proj, v_proj, ...), or one string that is a "
        r"regex matched against each full module name (e.g. '.*\.(q_proj|v_proj)')",
    )
    rslora: bool = Field(default=False, description="scale by alpha/sqrt(r) instead of alpha/r")
    dora: bool = Field(
        default=False, description="DoRA: learn each weight's magnitude apart from its direction"
    )
    init: LoraInit = Field(
        default="default",
        description="default: B = 0, A Kaiming-uniform; gaussian: A Gaussian; pissa: A and B from the top "
        "singular vectors of each weight; olora: from its QR decomposition (the saved adapter is converted "
        "to a plain LoRA of rank 2r that applies to the unchanged base)",
    )
    pissa_niter: PositiveInt | None = Field(
        default=None, description="init pissa: fast randomized SVD with this many iterations; None: exact SVD"
    )
    lr_ratio: PositiveFloat | None = Field(
        default=None, description="LoRA+: the B matrices learn at lr * lr_ratio (the paper suggests 16)"
    )
    rank_pattern: dict[str, PositiveInt] = Field(
        default_factory=dict, description="per-module rank: module name or regex -> r (peft's rank_pattern)"
    )
    alpha_pattern: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="per-module alpha: module name or regex -> alpha (peft's alpha_pattern)",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="modules trained in full and saved whole beside the adapter (e.g. 'lm_head', 'score')",
    )
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="special tokens added to the tokenizer; the embedding grows to fit and the new tokens' "
        "rows of the embedding (and of an untied LM head) train and are saved in the adapter",
    )

    @field_validator("targets")
    @classmethod
    def _targets_valid(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and value != "all-linear":
            _check_regex(value, "a single string other than 'all-linear' is a regex over full module names")
        if isinstance(value, list) and not value:
            raise ValueError("is empty: name at least one module, or use 'all-linear'")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            _check_regex(key, "each key is a module name or a regex over module names")
        return value

    @field_validator("new_special_tokens")
    @classmethod
    def _tokens_valid(cls, value: list[str]) -> list[str]:
        if any(not token for token in value) or len(set(value)) != len(value):
            raise ValueError("expected distinct, non-empty token strings")
        return value

    @model_validator(mode="after")
    def _options_combine(self) -> LoraAdapter:
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError(
                f"adapter.pissa_niter applies to adapter.init: pissa only (init is {self.init!r})"
            )
        if self.init in ("pissa", "olora") and self.dora:
            raise ValueError(
                f"adapter.init: {self.init} cannot be combined with adapter.dora (peft converts only plain "
                "LoRA back onto the unchanged base); use init: default with dora"
            )
        return self


def _check_regex(pattern: str, what: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regex ({exc}); {what}") from None


QUANT_EXTRA_HINT = "install it with: pip install 'tunesmith[qlora]' (or pip install bitsandbytes)"


class QloraAdapter(LoraAdapter):
    """LoRA over a base whose linear layers are quantized by bitsandbytes (on CPU as on CUDA)."""

    type: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    bits: Literal[4, 8] = Field(default=4, description="4: NF4/FP4 weights (QLoRA); 8: LLM.int8()")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type")
    double_quant: bool = Field(default=True, description="4-bit: quantize the quantization constants too")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="4-bit matmul dtype; auto: bf16 on a GPU that supports it, else fp32"
    )

    @model_validator(mode="after")
    def _quantization_valid(self) -> QloraAdapter:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"adapter.type: qlora needs the bitsandbytes package; {QUANT_EXTRA_HINT}")
        four_bit_only = {"quant_type", "double_quant", "compute_dtype"} & self.model_fields_set
        if self.bits == 8 and four_bit_only:
            raise ValueError(
                f"adapter.{sorted(four_bit_only)[0]} applies to adapter.bits: 4 only; remove it or set bits: 4"
            )
        if self.init in ("pissa", "olora"):
            raise ValueError(
                f"adapter.init: {self.init} rewrites the base weights, which are quantized under qlora; "
                "use type: lora for it, or init: default / gaussian"
            )
        return self


class FullAdapter(Section):
    type: Literal["full"]


class FreezeAdapter(Section):
    type: Literal["freeze"]
    trainable_layers: PositiveInt | None = Field(
        default=2, description="train only the last N decoder layers"
    )
    trainable_modules: list[str] = Field(
        default_factory=list, description="extra parameter-name substrings to train (e.g. 'lm_head', 'norm')"
    )


Adapter = Annotated[LoraAdapter | QloraAdapter | FullAdapter | FreezeAdapter, Field(discriminator="type")]


class DataSource(Section):
    path: str = Field(description="a local .jsonl/.json/.csv/.parquet/.txt file, a directory or a glob")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "kto", "prompts"] = Field(
        default="auto",
        description="preference: prompt + chosen + rejected (strings or messages), sharegpt "
        "conversations + chosen + rejected, or OpenAI's input/preferred_output/non_preferred_output; "
        "kto: prompt + completion + label (or messages + label); prompts: prompt or messages, other "
        "columns passed to GRPO's reward functions",
    )
    template: str | None = Field(
        default=None, description="chat template for this source only; None: data.template"
    )
    weight: PositiveFloat | None = Field(
        default=None,
        description="sampling proportion: weighted sources share their combined size in this ratio",
    )
    samples: PositiveInt | None = Field(
        default=None, description="exactly this many samples: fewer is a seeded subset, more repeats"
    )

    @field_validator("samples")
    @classmethod
    def _not_with_weight(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("weight") is not None:
            raise ValueError("cannot be combined with weight (set a proportion or a count, not both)")
        return value


class DataConfig(Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] = Field(default_factory=list, description="held-out files; overrides eval_split")
    eval_split: Fraction = Field(default=0.0, description="fraction of the training rows held out for eval")
    seq_len: PositiveInt = 1024
    template: str | None = Field(
        default=None, description="None: the tokenizer's own chat template; a built-in name or a .jinja path"
    )
    train_on_prompt: bool = Field(default=False, description="train on every token, not only assistant turns")
    mask_history: bool = Field(
        default=False, description="train only the last assistant turn of each conversation"
    )
    reasoning: Literal["keep", "strip"] = Field(
        default="keep", description="'strip': remove <think>...</think> from assistant turns before rendering"
    )
    packing: bool = Field(default=True, description="padding-free packing of samples into rows of seq_len")
    dedup: bool = Field(
        default=False, description="drop samples whose tokens and labels repeat an earlier one"
    )
    shuffle: bool = Field(
        default=True, description="shuffle the mixed training samples (seeded by data.seed)"
    )
    seed: int = Field(
        default=0,
        description="seed for the eval split, mixture subsets and shuffling (independent of train.seed)",
    )
    num_proc: PositiveInt | None = Field(
        default=None, description="processes that tokenize large sources; None: min(4, CPU count)"
    )
    cache: bool = Field(default=True, description="cache tokenized sources under <cache root>/data")
    streaming: bool = Field(
        default=False,
        description="read .jsonl training files block by block (bounded memory); needs train.max_steps",
    )
    stream_block_rows: PositiveInt = Field(
        default=4096, description="rows read, packed and shuffled together when streaming"
    )
    pretrain_overlap: Annotated[int, Field(ge=0)] = Field(
        default=0, description="method pretrain: tokens shared by consecutive windows of one long document"
    )
    on_error: Literal["raise", "skip"] = "raise"
    max_dropped_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="abort if more than this fraction of rows is skipped or dropped"
    )

    @field_validator("mask_history")
    @classmethod
    def _not_with_train_on_prompt(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("train_on_prompt"):
            raise ValueError("cannot be combined with data.train_on_prompt (which trains every token)")
        return value

    @field_validator("eval")
    @classmethod
    def _eval_takes_every_row(cls, value: list[DataSource]) -> list[DataSource]:
        for i, source in enumerate(value):
            if source.weight is not None or source.samples is not None:
                raise ValueError(
                    f"data.eval[{i}] sets weight or samples, which apply to training sources only"
                )
        return value


class TrainConfig(Section):
    epochs: PositiveFloat = 3
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 2e-4
    weight_decay: NonNegFloat = 0.0
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    warmup_steps: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="warmup length in steps; when set it replaces warmup_ratio"
    )
    scheduler: Literal["cosine", "linear", "constant", "cosine_with_restarts", "wsd", "inverse_sqrt"] = Field(
        default="cosine",
        description="lr after warmup: cosine/linear decay to min_lr_ratio; cosine_with_restarts: num_cycles "
        "cosine decays; wsd: warmup-stable-decay, constant then a decay over the last wsd_decay_ratio of "
        "the steps; inverse_sqrt: lr * sqrt(warmup / step); constant",
    )
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="the lowest lr of a decaying schedule, as a fraction of train.lr"
    )
    num_cycles: PositiveInt = Field(default=1, description="cosine_with_restarts: cosine decays in the run")
    wsd_decay_ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.1, description="wsd: fraction of all steps spent in the final decay"
    )
    wsd_decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field(
        default="linear", description="wsd: shape of the final decay"
    )
    max_grad_norm: NonNegFloat | None = 1.0
    seed: int = 0
    eval_every: PositiveInt | None = Field(
        default=None, description="steps between evals; None: each epoch end"
    )
    save_every: PositiveInt | None = Field(
        default=None, description="steps between checkpoints; None: at the end"
    )
    save_total_limit: PositiveInt | None = 2
    log_every: PositiveInt = 1
    resume: Literal["auto", "never"] | str = Field(
        default="never", description="'auto': continue from the latest checkpoint; or a checkpoint path"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 (autocast, fp32 trainable weights) on GPUs that support it and on CPUs "
        "where a measured bf16 matmul is at least 2x fp32 (AMX, AVX512_BF16); fp32 elsewhere. fp16: autocast with dynamic loss scaling (overflowing steps are "
        "skipped and counted); meant for GPUs without bf16",
    )
    gradient_checkpointing: bool = False
    lean_activations: bool = Field(
        default=False,
        description="SwiGLU (and trainable RMSNorm) keep less for the backward and recompute the rest: "
        "13% less activation memory on the default model with LoRA, about 3% slower on CPU",
    )
    activation_offload: bool = Field(
        default=False,
        description="with gradient_checkpointing on a GPU: keep checkpointed activations in CPU memory",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder layer: faster steps after a one-off compile "
        "(about 40-80 s on a 2-core CPU); pays on runs of more than a few dozen steps",
    )
    attention: Literal["auto", "varlen_sdpa", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        default="auto",
        description="auto: flash_attention_2 on a GPU where installed, else varlen_sdpa (per-sample causal SDPA); "
        "sdpa/eager isolate packed samples with a block-diagonal mask; flex_attention (GPU only: torch has "
        "no flex backward on CPU) with a block-causal BlockMask built from the position ids",
    )
    loss_chunk_size: PositiveInt = Field(
        default=1024, description="labelled tokens per chunk of the LM head + CE"
    )
    neftune_alpha: PositiveFloat | None = Field(
        default=None,
        description="NEFTune: uniform noise of size alpha/sqrt(L*d) on the input embeddings while training "
        "(L: each sample's real length, d: hidden size; the paper uses 5-15); None: off. Never in eval",
    )


OptimizerName = Literal[
    "adamw",
    "adamw_8bit",
    "paged_adamw_8bit",
    "adafactor",
    "lion",
    "muon",
    "galore",
    "apollo",
    "adam_mini",
    "badam",
]


class GaLoreOptions(Section):
    """GaLore: Adam on gradients projected onto their top singular vectors (Zhao et al., 2024)."""

    rank: PositiveInt = Field(default=128, description="rank of the projected gradient")
    update_proj_gap: PositiveInt = Field(default=200, description="steps between SVDs of the gradient")
    scale: PositiveFloat = Field(
        default=0.25, description="the update is multiplied by this (the paper's alpha)"
    )
    proj_type: Literal["std", "left", "right"] = Field(
        default="std",
        description="std: project the shorter side of each weight; left/right: always that side",
    )


class ApolloOptions(Section):
    """APOLLO: Adam's per-channel scaling estimated in a random low-rank space (Zhu et al., 2024)."""

    rank: PositiveInt = Field(default=256, description="rank of the random projection (APOLLO-Mini: 1)")
    update_proj_gap: PositiveInt = Field(default=200, description="steps between new random projections")
    scale: PositiveFloat = Field(
        default=1.0, description="the update is multiplied by sqrt(scale) (Mini: 128)"
    )
    scale_type: Literal["channel", "tensor"] = Field(
        default="channel", description="one scaling factor per channel, or one per tensor (APOLLO-Mini)"
    )
    norm_growth_limit: bool = Field(
        default=True, description="cap each update's norm at 1.01x the previous one"
    )


class MuonOptions(Section):
    """Muon (orthogonalised momentum) for 2-D hidden weights; AdamW for embeddings, head, norms, biases."""

    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95
    nesterov: bool = True
    ns_steps: PositiveInt = Field(default=5, description="Newton-Schulz iterations per step")
    adjust_lr: Literal["match_rms_adamw", "original"] = Field(
        default="match_rms_adamw",
        description="match_rms_adamw: Muon's update has AdamW's RMS, so one train.lr serves both; original: "
        "Keller Jordan's shape scaling (use a larger lr, about 0.02)",
    )


class BAdamOptions(Section):
    """BAdam: block coordinate descent, Adam on one decoder layer at a time (Luo et al., 2024)."""

    switch_every: PositiveInt = Field(default=50, description="optimizer steps before the next block")
    switch_mode: Literal["random", "ascending", "descending"] = Field(
        default="random", description="order of the blocks; random: a new seeded permutation each round"
    )
    always_active: list[str] = Field(
        default_factory=list,
        description="parameter-name substrings trained at every step (e.g. 'norm'); parameters outside the "
        "decoder layers (embeddings, head) are trained only when listed here",
    )


class OptimConfig(Section):
    """The optimizer. The defaults are AdamW exactly as before this section existed."""

    name: OptimizerName = "adamw"
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] | None = Field(
        default=None, description="None: the optimizer's own (AdamW family (0.9, 0.999), Lion (0.9, 0.99))"
    )
    eps: PositiveFloat | None = Field(default=None, description="None: 1e-8 (Adafactor: its own 1e-3 scheme)")
    weight_decay: NonNegFloat | None = Field(
        default=None, description="None: train.weight_decay; never applied to norms and biases"
    )
    fused: bool | None = Field(
        default=None, description="adamw/badam: fused kernel; None: fused where the device supports it"
    )
    foreach: bool | None = Field(default=None, description="adamw/badam/adafactor: multi-tensor kernel")
    galore: GaLoreOptions = Field(default_factory=GaLoreOptions)
    apollo: ApolloOptions = Field(default_factory=ApolloOptions)
    muon: MuonOptions = Field(default_factory=MuonOptions)
    badam: BAdamOptions = Field(default_factory=BAdamOptions)

    @model_validator(mode="after")
    def _options_match_name(self) -> OptimConfig:
        """`optim: {name: adamw, galore: {rank: 8}}` is a mistake the run would otherwise ignore."""
        for section in ("galore", "apollo", "muon", "badam"):
            default = type(self).model_fields[section].get_default(call_default_factory=True)
            if section != self.name and getattr(self, section) != default:
                raise ValueError(f"an optim.{section} section is set but optim.name is {self.name!r}")
        if self.name not in ("adamw", "badam") and self.fused:
            raise ValueError(f"optim.fused applies to adamw and badam, not {self.name}")
        if self.fused and self.foreach:
            raise ValueError("optim.fused and optim.foreach cannot both be true")
        if self.name == "adafactor" and self.betas is not None:
            raise ValueError(
                "adafactor has no betas (it uses a decaying second-moment rate); unset optim.betas"
            )
        return self


class DPOConfig(Section):
    """Direct preference optimisation on chosen/rejected pairs (method: dpo)."""

    beta: PositiveFloat = Field(default=0.1, description="strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid",
        description="sigmoid: the DPO paper; ipo: squared loss on length-averaged log-ratios; hinge: "
        "SLiC; robust: unbiased under label noise (needs label_smoothing > 0)",
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        default=0.0, description="assumed fraction of pairs whose preference is flipped (cDPO, robust)"
    )
    rpo_alpha: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="weight of an added NLL term on the chosen answers (RPO); None: off"
    )
    precompute_ref: bool = Field(
        default=False,
        description="compute the reference log-probs once before training and keep them with the data "
        "(full/freeze tuning then needs no frozen copy of the model)",
    )


class SimPOConfig(Section):
    """Reference-free preference optimisation on length-averaged log-probs (method: simpo)."""

    beta: PositiveFloat = Field(default=2.0, description="scale of the length-averaged log-prob rewards")
    gamma: NonNegFloat = Field(
        default=1.0, description="target reward margin (the paper's gamma; gamma/beta = 0.5)"
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        default=0.0, description="assumed fraction of flipped preferences (conservative form)"
    )


class ORPOConfig(Section):
    """SFT on the chosen answer plus an odds-ratio preference term, no reference (method: orpo)."""

    beta: PositiveFloat = Field(default=0.1, description="weight of the odds-ratio term (the paper's lambda)")


class KTOConfig(Section):
    """Kahneman-Tversky optimisation on single completions labelled good or bad (method: kto)."""

    beta: PositiveFloat = Field(default=0.1, description="strength of the pull towards the reference model")
    desirable_weight: PositiveFloat = Field(
        default=1.0, description="loss weight of desirable (label true) rows"
    )
    undesirable_weight: PositiveFloat = Field(
        default=1.0, description="loss weight of undesirable rows; raise it when they are rarer"
    )
    precompute_ref: bool = Field(
        default=False,
        description="not supported for kto: its KL pairs change with each epoch's batches, so the "
        "reference cannot be computed once (true is refused with this reason)",
    )


class RewardModelConfig(Section):
    """A scalar-head reward model trained on preference pairs (method: reward)."""

    center_rewards_coefficient: NonNegFloat | None = Field(
        default=None, description="adds c (r_chosen + r_rejected)^2, keeping scores centred at 0; None: off"
    )


class RewardFunction(Section):
    function: str = Field(
        description="a built-in (regex, exact_match, length_penalty) or a callable 'package.module:name'"
    )
    weight: float = Field(default=1.0, description="this function's weight in the summed reward")
    args: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="keyword arguments for the function, e.g. {pattern: '...'}"
    )


class GRPOConfig(Section):
    """Group relative policy optimisation with reward functions (method: grpo)."""

    num_generations: Annotated[int, Field(ge=2)] = Field(
        default=4, description="completions sampled per prompt; advantages are normalised within them"
    )
    max_completion_length: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    epsilon: PositiveFloat = Field(default=0.2, description="clip range of the policy ratio")
    epsilon_high: PositiveFloat | None = Field(default=None, description="upper clip range; None: epsilon")
    beta: NonNegFloat = Field(
        default=0.0, description="weight of the KL penalty to the reference; 0 skips the reference pass"
    )
    loss_type: Literal["grpo", "dr_grpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="divide advantages by the group's std, the batch's, or not at all"
    )
    rewards: list[RewardFunction] = Field(
        default_factory=list, description="reward functions, summed with their weights"
    )
    log_completions_every: PositiveInt | None = Field(
        default=10, description="steps between writes of sample completions to completions.jsonl; None: never"
    )

    @field_validator("rewards")
    @classmethod
    def _at_least_one(cls, value: list[RewardFunction]) -> list[RewardFunction]:
        if not value:
            raise ValueError(
                "grpo needs at least one reward function, e.g. [{function: exact_match, args: {column: answer}}]"
            )
        return value


class OutputConfig(Section):
    dir: str = "runs/run"
    overwrite: bool = Field(default=False, description="allow writing into a non-empty run directory")


TrackerName = Literal["tensorboard", "mlflow", "wandb", "swanlab"]


class TrackingConfig(Section):
    """Where metrics go besides `metrics.jsonl` (which is always written)."""

    backends: list[TrackerName] = Field(
        default_factory=list, description="trackers to log to; each is an optional extra"
    )
    project: str = Field(default="tunesmith", description="the tracker's project or experiment name")
    run_name: str | None = Field(default=None, description="the tracker's run name; None: the run dir's name")


EvalKind = Literal["perplexity", "mc", "gen"]


class EvalTask(Section):
    """One evaluation task: `tunesmith eval --task KIND:PATH` or an entry of `eval.tasks`."""

    kind: EvalKind
    path: str = Field(description="a local task file (jsonl/json/csv/parquet)")
    shots: Annotated[int, Field(ge=0)] = Field(default=0, description="mc: examples taken from the dev split")
    dev_path: str | None = Field(
        default=None, description="mc: the file the shots come from; None: PATH's rows marked split: dev"
    )
    limit: PositiveInt | None = Field(default=None, description="score only the first N items")
    chat_template: bool = Field(default=False, description="mc: render the prompt through the chat template")
    all_tokens: bool = Field(
        default=False, description="perplexity: score every token, not only assistant turns"
    )
    match: Literal["exact", "regex", "contains", "callable"] = Field(
        default="exact", description="gen: how a generated answer is compared with the gold one"
    )
    pattern: str | None = Field(
        default=None, description="gen, match regex: the answer is the last match of this regex"
    )
    function: str | None = Field(
        default=None, description="gen, match callable: 'module:function' or 'file.py:function'"
    )
    max_new_tokens: PositiveInt = Field(default=256, description="gen: tokens generated per item")

    @model_validator(mode="before")
    @classmethod
    def _from_spec(cls, data: object) -> object:
        """`"mc:tasks/science.jsonl"` is short for `{kind: mc, path: tasks/science.jsonl}`."""
        if isinstance(data, str):
            kind, sep, path = data.partition(":")
            if not sep or not path:
                raise ValueError(f"an eval task is KIND:PATH with KIND perplexity, mc or gen, got {data!r}")
            return {"kind": kind, "path": path}
        return data


class EvalConfig(Section):
    """Tasks scored every `train.eval_every` steps and at the end, beside the eval loss."""

    tasks: list[EvalTask] = Field(default_factory=list)


METHOD_SECTIONS = ("dpo", "simpo", "orpo", "kto", "reward", "grpo")
"""Methods with a settings section of the same name."""


class RunConfig(Section):
    model: str = Field(default="default", description="'default', a local HF model dir, or a .gguf file")
    trust_remote_code: bool = False
    method: Literal["sft", "pretrain", "dpo", "simpo", "orpo", "kto", "reward", "grpo"] = "sft"
    adapter: Adapter = Field(default_factory=LoraAdapter)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    simpo: SimPOConfig = Field(default_factory=SimPOConfig)
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    reward: RewardModelConfig = Field(default_factory=RewardModelConfig)
    grpo: GRPOConfig | None = Field(
        default=None, description="required for method grpo (its reward functions)"
    )
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _adapter_defaults_to_lora(cls, data: object) -> object:
        """`adapter: {r: 8}` means LoRA, as `adapter.r=8` on the command line does."""
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict) and "type" not in data["adapter"]:
            data = {**data, "adapter": {"type": "lora", **data["adapter"]}}
        return data

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected 'default', a model directory or a .gguf file, got an empty string")
        return value

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self) -> RunConfig:
        if self.data.streaming and self.train.max_steps is None:
            raise ValueError("data.streaming needs train.max_steps (a stream has no known length)")
        return self

    @model_validator(mode="after")
    def _method_section_matches_method(self) -> RunConfig:
        """A `kto:` section under `method: dpo` is a mistake the run would otherwise silently ignore.

        Sections at their defaults are no mistake (a config dumped with every section loads back)."""
        for name in METHOD_SECTIONS:
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if name != self.method and getattr(self, name) != default:
                raise ValueError(
                    f"a {name}: section is set but method is {self.method!r}; set method: {name}"
                )
        return self

    @model_validator(mode="after")
    def _method_matches_data(self) -> RunConfig:
        if self.method not in ("sft", "pretrain") and self.data.streaming:
            raise ValueError(
                f"data.streaming is not supported for method '{self.method}' yet; load the rows in memory"
            )
        if self.method == "grpo" and self.grpo is None:
            raise ValueError(
                "method grpo needs a grpo: section with its reward functions, e.g. "
                "grpo: {rewards: [{function: exact_match, args: {column: answer}}]}"
            )
        if self.method == "dpo" and self.dpo.loss_type == "robust" and self.dpo.label_smoothing == 0:
            raise ValueError("dpo.loss_type robust needs dpo.label_smoothing > 0 (the assumed flip rate)")
        if self.method == "dpo" and self.dpo.loss_type in ("ipo", "hinge") and self.dpo.label_smoothing:
            raise ValueError(f"dpo.label_smoothing has no meaning for dpo.loss_type {self.dpo.loss_type}")
        if self.method == "pretrain" and self.data.train_on_prompt:
            raise ValueError(
                "data.train_on_prompt has no meaning for method 'pretrain' (every token is trained)"
            )
        return self
