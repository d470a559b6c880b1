"""4- and 8-bit base weights through bitsandbytes (QLoRA), on CPU as on CUDA.

Three ways in, one result (linear layers as `bnb.nn.Linear4bit` / `Linear8bitLt`, the rest as it was):
- `quantization_config(adapter)` for `from_pretrained`: the weights are quantized while they load, so
  the fp32 copy of the whole model never exists (the memory QLoRA is for);
- a checkpoint saved already quantized (its config.json has a `quantization_config`) loads as it is;
- `quantize_in_place(model, adapter)` for a model that is already loaded in full precision.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.load import ConfigError
from tunesmith.config.schema import QUANT_EXTRA_HINT, QloraAdapter

log = logging.getLogger(__name__)

SKIP_MODULES = ("lm_head",)
"""Never quantized: the LM head (tied to the embedding in many models, and the loss depends on it)."""


def require_bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"adapter.type: qlora needs the bitsandbytes package; {QUANT_EXTRA_HINT}") from None
    return bitsandbytes


def compute_dtype(adapter: QloraAdapter) -> torch.dtype:
    """`auto`: bf16 on a CUDA GPU that has it (fp16 on older ones), fp32 on CPU."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if adapter.compute_dtype != "auto":
        return named[adapter.compute_dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(adapter: QloraAdapter) -> Any:
    """The `BitsAndBytesConfig` that `from_pretrained` quantizes with."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if adapter.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(adapter),
        llm_int8_skip_modules=list(SKIP_MODULES),
    )


def load_device_map() -> dict[str, Any]:
    """Quantized weights are placed while they load: the whole model on this process's device."""
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}


def checkpoint_quantization(model_dir: Path) -> dict[str, Any] | None:
    """The `quantization_config` a pre-quantized checkpoint carries in its config.json, if any."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    found = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    return found if isinstance(found, dict) else None


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds bitsandbytes-quantized weights."""
    return any(is_quantized_linear(module) for module in model.modules())


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes Linear (a subclass of nn.Linear whose weight is packed integers, not floats)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and weight is not None
        and type(module).__module__.startswith("bitsandbytes")
        and not weight.is_floating_point()
    )


def quantize_in_place(model: nn.Module, adapter: QloraAdapter) -> int:
    """Replace the model's nn.Linear layers (but the LM head) by bitsandbytes ones; returns how many.

    Matches what `from_pretrained(quantization_config=...)` produces, for a model that is already
    in memory: a caller that loaded in full precision still gets QLoRA, with the full-precision
    copy held only while this runs."""
    bnb = require_bitsandbytes()
    device = next(model.parameters()).device
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in SKIP_MODULES:
            continue
        new = _quantized_linear(bnb, module, adapter)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(device))
        replaced += 1
    setattr(model, f"is_loaded_in_{adapter.bits}bit", True)  # what peft reads to tell a quantized model
    return replaced


def _quantized_linear(bnb: Any, linear: nn.Linear, adapter: QloraAdapter) -> nn.Module:
    weight = linear.weight.data.detach().float().cpu()
    has_bias = linear.bias is not None
    if adapter.bits == 8:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, threshold=6.0)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype(adapter),
            compress_statistics=adapter.double_quant,
            quant_type=adapter.quant_type,
        )
        new.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            compress_statistics=adapter.double_quant,
            quant_type=adapter.quant_type,
        )
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.detach().float().cpu(), requires_grad=False)
    return new


def prepare_for_training(model: nn.Module) -> nn.Module:
    """peft's `prepare_model_for_kbit_training`, without the gradient checkpointing it turns on by default.

    It freezes the base and keeps the non-quantized parameters (norms, embeddings) in fp32; whether
    activations are checkpointed stays `train.gradient_checkpointing`'s decision."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_dequantized(model_dir: Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """A pre-quantized checkpoint loaded and de-quantized back to plain nn.Linear layers in `dtype`
    (for merging an adapter into full-precision weights)."""
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=load_device_map(), **kwargs
    )
    model = model.dequantize()
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model
