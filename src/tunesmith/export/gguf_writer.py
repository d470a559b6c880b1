"""Write a (merged) transformers model as one GGUF file, through the `gguf` package.

Types: f32, f16, bf16, q8_0 and the 4/5-bit block types q4_0, q4_1, q5_0, q5_1 (quantized by
`gguf.quants`), and the K-quant mixes q4_k_m, q5_k_m and q6_k (encoded by `gguf_kquants`). Which tensor gets
which type follows llama.cpp:

- 1-D tensors, norms and biases stay f32 under every type (llama.cpp's kernels expect them so);
- under the 4/5-bit types the output projection (or, with tied embeddings, the token embedding that
  doubles as it) is q8_0: llama-quantize gives that tensor a wider type (q6_k) because the logits are
  the most sensitive to it, and q8_0 is the widest of these block types;
- q4_k_m and q5_k_m are llama-quantize's mixes: q6_k for the output and for attn_v / ffn_down in the
  layers its `use_more_bits` rule picks, q4_k / q5_k elsewhere; q6_k is q6_k throughout;
- a weight whose rows do not divide into the type's blocks falls back as llama-quantize does
  (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), and to f16 when even 32-value blocks do not fit.

Other K-quants and i-quants are refused with a pointer to llama.cpp's `llama-quantize`, which
requantizes an f16/bf16 export.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.export.gguf_arch import arch_for, extra_tensors, transform_tensor, write_hparams
from tunesmith.export.gguf_kquants import ENCODERS, FALLBACK, k_type
from tunesmith.export.gguf_tokenizer import write_tokenizer

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
_NARROW = ("q4_0", "q4_1", "q5_0", "q5_1")
_K_MIXES = ("q4_k_m", "q5_k_m", "q6_k")
_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
}


class UnsupportedGGUFType(ValueError):
    pass


def check_type(name: str) -> str:
    """The canonical type name, or a refusal that names the supported types and how to get the others."""
    key = name.strip().lower()
    if key in TYPES:
        return key
    supported = ", ".join(TYPES)
    if "_k" in key or key.startswith(("iq", "tq")):
        raise UnsupportedGGUFType(
            f"--gguf {name}: tunesmith writes these types: {supported}. For {key}, export f16 or bf16 "
            f"and requantize it with llama.cpp: llama-quantize model-f16.gguf model-{key}.gguf {key.upper()}"
        )
    raise UnsupportedGGUFType(f"--gguf {name}: unknown type; supported: {supported}")


@dataclass
class GGUFExport:
    path: Path
    type: str
    arch: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: dict[str, str] = field(default_factory=dict)  # Hugging Face tensor name -> type written


def tensor_type(gguf_name: str, ndim: int, file_type: str, is_output: bool, n_layers: int = 0) -> str:
    """The type llama.cpp's converter and quantizer would give this tensor in a `file_type` file."""
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "f32"
    if file_type in _K_MIXES:
        return k_type(gguf_name, file_type, n_layers, is_output)
    if file_type in _NARROW and is_output:
        return "q8_0"
    return file_type


def encode(data: np.ndarray, type_name: str) -> tuple[np.ndarray, Any, str]:
    """(bytes, GGML type, type name) for `data` as `type_name`, or the fallback type its rows fit."""
    import gguf

    if type_name in ENCODERS:
        if data.shape[-1] % 256 == 0:
            return ENCODERS[type_name](data), gguf.GGMLQuantizationType[type_name.upper()], type_name
        type_name = FALLBACK[type_name]
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    try:
        return gguf.quants.quantize(data, qtype), qtype, type_name
    except gguf.QuantError:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16, "f16"


def write_gguf(
    model: Any,
    tokenizer: Any,
    out: Path,
    type_name: str,
    *,
    chat_template: str | None,
    eot_id: int | None,
    name: str | None = None,
) -> GGUFExport:
    """Write `model` (a plain transformers model, adapters merged) to `out`, committed by a final rename."""
    import gguf

    type_name = check_type(type_name)
    config = model.config
    spec = arch_for(config)
    arch = gguf.MODEL_ARCH[spec.gguf_arch]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    result = GGUFExport(out, type_name, gguf.MODEL_ARCH_NAMES[arch])

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or "model"))
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[type_name]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    result.notes += write_hparams(writer, config, spec)
    result.notes += write_tokenizer(writer, tokenizer, n_vocab, chat_template, eot_id, spec.gguf_arch)

    counts: Counter[str] = Counter()
    wider: Counter[tuple[str, str, int]] = Counter()
    for hf_name, gguf_name, data in _tensors(state, config, spec, names, tied):
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        wanted = tensor_type(gguf_name, data.ndim, type_name, is_output, int(config.num_hidden_layers))
        encoded, qtype, written = encode(data, wanted)
        if written != wanted:
            result.fallbacks.append(f"{gguf_name} {list(data.shape)}: {written} instead of {wanted}")
            wider[(wanted, written, int(data.shape[-1]))] += 1
        counts[written] += 1
        if hf_name is not None:
            result.plan[hf_name] = written
        writer.add_tensor(gguf_name, encoded, raw_dtype=qtype)
    del state
    result.tensor_types = dict(counts)
    result.notes += [
        f"{n} tensor{'s' * (n > 1)} with rows of {size} values stored as {written}: the rows do not fill "
        f"{wanted} blocks"
        for (wanted, written, size), n in sorted(wider.items())
    ]
    _commit(writer, out)
    return result


def _tensors(state: dict[str, Any], config: Any, spec: Any, names: Any, tied: bool):
    for gguf_name, data in extra_tensors(config, spec):
        yield None, gguf_name, data
    for hf_name, tensor in state.items():
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no GGUF name for tensor {hf_name!r} ({spec.model_type})")
        data = tensor.detach().to("cpu").float().numpy()
        yield hf_name, gguf_name, transform_tensor(spec, config, hf_name, data)


def _commit(writer: Any, out: Path) -> None:
    from tunesmith.training.durable import fsync_dir, fsync_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    try:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(staging)
        os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        staging.unlink(missing_ok=True)


def round_like_export(model: Any, plan: dict[str, str]) -> None:
    """Round `model`'s weights in place exactly as the export stored them (quantize, then dequantize with
    gguf's own code): the model a correct file must reproduce, whatever the type costs in accuracy."""
    import gguf
    import torch

    state = model.state_dict()
    with torch.no_grad():
        for hf_name, type_name in plan.items():
            if type_name == "f32":
                continue
            tensor = state[hf_name]
            data = tensor.detach().to("cpu").float().numpy()
            encoded, qtype, _ = encode(data, type_name)
            back = gguf.quants.dequantize(encoded, qtype).reshape(data.shape)
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(back)).to(tensor.dtype))
