"""Per-architecture GGUF facts: the llama.cpp architecture name, hyperparameter keys, tensor layout.

What each architecture needs follows llama.cpp's `convert_hf_to_gguf.py`:

- llama, mistral -> GGUF `llama`. Q and K projections are permuted from Hugging Face's rotary layout
  (first half / second half of each head) to llama.cpp's interleaved pairs; Llama 3 rope scaling
  becomes a `rope_freqs` tensor.
- qwen2 -> `qwen2`: no permutation; the q/k/v biases stay f32.
- gemma3 (text, `Gemma3ForCausalLM`) -> `gemma3`: every `*norm.weight` is stored with +1, because
  Gemma3RMSNorm computes `x * (1 + w)` while llama.cpp multiplies by the stored weight; the
  sqrt(hidden) embedding scale is applied by the runtime (both llama.cpp and transformers), so the
  embedding is written as is.

Tied embeddings: no `output.weight` is written; the runtime reuses `token_embd.weight`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


class UnsupportedModel(ValueError):
    """The model's architecture (or one of its settings) has no GGUF export here."""


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_shift: float = 0.0


ARCHS = {
    "llama": ArchSpec("llama", "LLAMA", permute_qk=True),
    "mistral": ArchSpec("mistral", "LLAMA", permute_qk=True),
    "qwen2": ArchSpec("qwen2", "QWEN2"),
    "gemma3_text": ArchSpec("gemma3_text", "GEMMA3", norm_shift=1.0),
}


def arch_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    hint = (
        " (a multimodal Gemma 3: export its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
    )
    raise UnsupportedModel(
        f"GGUF export supports the llama, mistral, qwen2 and gemma3 (text) architectures; this model is "
        f"{model_type!r}{hint}. Export it with --merge and convert that directory with llama.cpp's "
        "convert_hf_to_gguf.py"
    )


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def rope_parameters(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global rope parameters, sliding-window layers' parameters or None), for transformers 4 and 5 configs."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        if getattr(config, "rope_theta", None) is not None:
            params.setdefault("rope_theta", config.rope_theta)
    if "full_attention" in params:
        return dict(params["full_attention"]), params.get("sliding_attention")
    return params, None


def write_hparams(writer: Any, config: Any, spec: ArchSpec) -> list[str]:
    """Write the architecture's hyperparameters; return notes on what a runtime will do differently."""
    import gguf

    notes: list[str] = []
    n_head = int(config.num_attention_heads)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config.vocab_size))
    if spec.gguf_arch == "LLAMA":
        writer.add_rope_dimension_count(head_dim(config))

    rope, sliding_rope = rope_parameters(config)
    if (theta := rope.get("rope_theta")) is not None:
        writer.add_rope_freq_base(float(theta))
    if sliding_rope and sliding_rope.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding_rope["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif rope_type == "llama3" and spec.gguf_arch == "LLAMA":
        pass  # written as the rope_freqs tensor (extra_tensors)
    elif rope_type != "default":
        raise UnsupportedModel(
            f"GGUF export: rope scaling {rope_type!r} is not supported for {spec.model_type}"
        )

    window = getattr(config, "sliding_window", None)
    if spec.model_type == "gemma3_text":
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModel("GGUF export: gemma3 with attn_logit_softcapping is not supported")
        if (softcap := getattr(config, "final_logit_softcapping", None)) is not None:
            writer.add_final_logit_softcapping(float(softcap))
        if window is not None:
            writer.add_sliding_window(int(window))
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None and int(scalar) != head_dim(config):
            notes.append(
                f"query_pre_attn_scalar is {scalar}, not head_dim {head_dim(config)}: llama.cpp scales attention "
                "by 1/sqrt(head_dim) for Gemma 3 (except the 27B size)"
            )
        expected = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)
        ]
        if list(getattr(config, "layer_types", expected) or expected) != expected:
            notes.append("layer_types differ from Gemma 3's 5-sliding:1-global pattern that runtimes assume")
    elif (
        window is not None
        and window < config.max_position_embeddings
        and (spec.model_type == "mistral" or getattr(config, "use_sliding_window", False))
    ):
        notes.append(
            f"sliding_window {window} is not written: llama.cpp's {spec.gguf_arch.lower()} attends "
            "to the whole context"
        )
    return notes


def extra_tensors(config: Any, spec: ArchSpec) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3 rope frequency factors)."""
    rope, _ = rope_parameters(config)
    if spec.gguf_arch != "LLAMA" or (rope.get("rope_type") or rope.get("type")) != "llama3":
        return
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", np.asarray(factors, dtype=np.float32)


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotary halves -> llama.cpp interleaved pairs, per head (rows of a q/k projection)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def transform_tensor(spec: ArchSpec, config: Any, hf_name: str, data: np.ndarray) -> np.ndarray:
    if spec.permute_qk:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, int(config.num_attention_heads))
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads(config))
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        data = data + np.float32(spec.norm_shift)
    return data
