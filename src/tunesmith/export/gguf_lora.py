"""Write a run's LoRA alone as a GGUF LoRA adapter, the file llama.cpp applies over a base model
(`llama-cli -m base.gguf --lora adapter.gguf`, `llama-server --lora`).

The layout is that of llama.cpp's convert_lora_to_gguf.py: `general.type` "adapter", `adapter.type`
"lora", `adapter.lora.alpha`, and for every adapted weight the pair `<base tensor name>.lora_a`
(rank x in) and `.lora_b` (out x rank); llama.cpp adds (alpha / rank) * lora_b @ lora_a to the base
weight. The base model's own layout conversions apply to the pair as they apply to the weight: for
llama/mistral the q/k row permutation permutes lora_b's rows (lora_a, on the input side, is unchanged).

No vocabulary and no hyperparameters: the adapter is only meaningful over a GGUF of the base it was
trained on. Per-module scalings (rsLoRA, rank or alpha patterns) are folded into lora_b so that the one
file-wide alpha gives each module the scaling it had in training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.export.gguf_arch import arch_for, transform_tensor

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


class UnsupportedAdapter(ValueError):
    pass


@dataclass
class LoraTarget:
    hf_name: str  # the adapted base weight, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # its GGUF name, e.g. blk.0.attn_q.weight
    rank: int


@dataclass
class LoraExport:
    path: Path
    type: str
    arch: str
    alpha: float
    targets: list[LoraTarget] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_adapter_type(name: str) -> str:
    key = name.strip().lower()
    if key not in ADAPTER_TYPES:
        raise UnsupportedAdapter(
            f"--adapter-only --gguf {name}: a LoRA adapter is written as one of {', '.join(ADAPTER_TYPES)} "
            "(its matrices are small; llama.cpp applies them over a base of any type)"
        )
    return key


def lora_pairs(model: Any) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(base weight name, A (rank x in), B (out x rank), scaling) for every LoRA layer of a PeftModel,
    refusing what a GGUF LoRA adapter cannot hold."""
    adapter = getattr(model, "active_adapter", "default")
    if any("modules_to_save" in name for name, _ in model.named_parameters()):
        raise UnsupportedAdapter(
            "--adapter-only: this run also trains whole modules (modules_to_save), which a GGUF LoRA "
            "adapter cannot hold; export with --gguf TYPE to merge everything into one file"
        )
    pairs = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys") or adapter not in lora_a:
            if adapter in (getattr(module, "lora_embedding_A", None) or {}):
                raise UnsupportedAdapter(f"--adapter-only: the LoRA on embedding {name} is not supported")
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise UnsupportedAdapter(
                "--adapter-only: a DoRA adapter is not a plain LoRA; export with --gguf TYPE to merge it"
            )
        lora_b = module.lora_B[adapter]
        if getattr(lora_b, "bias", None) is not None:
            raise UnsupportedAdapter("--adapter-only: a LoRA with bias terms is not supported")
        base_name = name.removeprefix("base_model.model.") + ".weight"
        a = lora_a[adapter].weight.detach().to("cpu").float().numpy()
        b = lora_b.weight.detach().to("cpu").float().numpy()
        pairs.append((base_name, a, b, float(module.scaling[adapter])))
    if not pairs:
        raise UnsupportedAdapter("--adapter-only: the model holds no LoRA layers")
    return pairs


def write_lora_gguf(model: Any, out: Path, type_name: str, *, name: str | None = None) -> LoraExport:
    """Write `model`'s (a PeftModel with one LoRA) adapter to `out`, committed by a final rename."""
    import gguf

    from tunesmith.export.gguf_writer import _commit, encode

    type_name = check_adapter_type(type_name)
    config = model.get_base_model().config
    spec = arch_for(config)
    arch = gguf.MODEL_ARCH[spec.gguf_arch]
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    pairs = lora_pairs(model)
    _, first_a, _, first_scaling = pairs[0]
    alpha = first_scaling * first_a.shape[0]  # llama.cpp's scale is alpha / rank
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name or "lora")
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[type_name]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    result = LoraExport(out, type_name, gguf.MODEL_ARCH_NAMES[arch], float(alpha))
    counts: Counter[str] = Counter()
    for hf_name, a, b, scaling in pairs:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            raise UnsupportedAdapter(f"--adapter-only: no GGUF tensor for the adapted weight {hf_name!r}")
        rank = a.shape[0]
        b = b * np.float32(scaling * rank / alpha)  # 1 unless this module's scaling differs
        b = transform_tensor(spec, config, hf_name, b)  # row conversions act on B's rows
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            encoded, qtype, written = encode(np.ascontiguousarray(data, dtype=np.float32), type_name)
            counts[written] += 1
            writer.add_tensor(gguf_name + suffix, encoded, raw_dtype=qtype)
        result.targets.append(LoraTarget(hf_name, gguf_name, rank))
    result.tensor_types = dict(counts)
    if counts.get("f16") and type_name == "q8_0":
        result.notes.append("lora_b matrices whose rows (the rank) do not fill 32-value blocks are f16")
    _commit(writer, out)
    return result


def base_weights(model: Any, targets: list[LoraTarget] | None = None) -> dict[str, np.ndarray]:
    """The adapted weights of `model` in GGUF layout (as the base file holds them), by GGUF name: read
    before merging for the base, after merging for the merged model."""
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    spec = arch_for(config)
    state = model.state_dict()
    out = {}
    for target in targets or []:
        key = target.hf_name
        if key not in state:  # a PeftModel: base_model.model.<name>.base_layer.weight
            key = "base_model.model." + target.hf_name.removesuffix(".weight") + ".base_layer.weight"
        data = state[key].detach().to("cpu").float().numpy().copy()  # merging writes in place
        out[target.gguf_name] = transform_tensor(spec, config, target.hf_name, data)
    return out
