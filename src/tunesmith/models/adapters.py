"""Decide what trains: LoRA and its variants (via peft), QLoRA, full fine-tuning, or freezing all but the
last layers.

Every LoRA option becomes a field of one `peft.LoraConfig`, so what is saved is peft's own adapter:
peft, vLLM and the exporters load it unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from typing import Any

from torch import nn

from tunesmith.config.schema import FreezeAdapter, FullAdapter, LoraAdapter, QloraAdapter

log = logging.getLogger(__name__)

_INITIAL_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, tempfile.TemporaryDirectory[str]] = (
    weakref.WeakKeyDictionary()
)
"""PiSSA/OLoRA models -> their adapter as initialised, which saving needs to convert the trained one."""


def apply_adapter(
    model: nn.Module, adapter: LoraAdapter | FullAdapter | FreezeAdapter, tokenizer: Any = None
) -> nn.Module:
    """Make the chosen parameters trainable; LoRA/QLoRA return a peft model wrapping `model`.

    `tokenizer` is needed for `adapter.new_special_tokens` (tokens it lacks are added to it here)."""
    if isinstance(adapter, LoraAdapter):
        return _apply_lora(model, adapter, tokenizer)
    if isinstance(adapter, FreezeAdapter):
        _apply_freeze(model, adapter)
        return model
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def lora_config(adapter: LoraAdapter, trainable_tokens: dict[str, list[int]] | None = None) -> Any:
    """The `peft.LoraConfig` that `adapter` describes."""
    from peft import LoraConfig

    init: bool | str = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[
        adapter.init
    ]
    if adapter.init == "pissa" and adapter.pissa_niter is not None:
        init = f"pissa_niter_{adapter.pissa_niter}"
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.targets,
        use_rslora=adapter.rslora,
        use_dora=adapter.dora,
        init_lora_weights=init,
        rank_pattern=dict(adapter.rank_pattern),
        alpha_pattern=dict(adapter.alpha_pattern),
        modules_to_save=list(adapter.modules_to_save) or None,
        trainable_token_indices=trainable_tokens or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _apply_lora(model: nn.Module, adapter: LoraAdapter, tokenizer: Any) -> nn.Module:
    from peft import get_peft_model

    if isinstance(adapter, QloraAdapter):
        model = _quantized_for_training(model, adapter)
    trainable_tokens = None
    if adapter.new_special_tokens:
        if tokenizer is None:
            raise ValueError("adapter.new_special_tokens: apply_adapter needs the tokenizer to add them to")
        ids = add_special_tokens(model, tokenizer, adapter.new_special_tokens)
        trainable_tokens = token_layers(model, ids)
    try:
        peft_model = get_peft_model(model, lora_config(adapter, trainable_tokens))
    except ValueError as exc:
        raise ValueError(f"adapter.targets: {exc}") from None
    if adapter.init in ("pissa", "olora"):
        _keep_initial_adapter(peft_model)
    return peft_model


def _quantized_for_training(model: nn.Module, adapter: QloraAdapter) -> nn.Module:
    from tunesmith.models.quantization import is_quantized, prepare_for_training, quantize_in_place

    if not is_quantized(model):  # loaded in full precision: quantize now (the load could have done it)
        count = quantize_in_place(model, adapter)
        log.info("qlora: quantized %d linear layers to %d bit after loading", count, adapter.bits)
    return prepare_for_training(model)


def add_special_tokens(model: nn.Module, tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add `tokens` (those the tokenizer lacks) as special tokens, grow the embedding to fit; their ids.

    New rows start at the mean of the existing embeddings (transformers' `mean_resizing`), so a new
    token's first logits are those of an average token, not of noise. Calling it again is a no-op."""
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False
    )
    embedding = model.get_input_embeddings()
    if len(tokenizer) > embedding.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"adapter.new_special_tokens: the tokenizer did not take {tokens!r}")
    return [int(i) for i in ids]


def token_layers(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices`: the embedding rows of `ids`, and the LM head's rows when the
    head is not tied to the embedding (a tied head follows its embedding in peft)."""
    names = {id(module): name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = {names[id(embedding)].rsplit(".", 1)[-1]: list(ids)}
    if head is not None and head.weight is not embedding.weight:
        layers[names[id(head)].rsplit(".", 1)[-1]] = list(ids)
    return layers


def _keep_initial_adapter(peft_model: Any) -> None:
    """Save the adapter as PiSSA/OLoRA initialised it, for `adapter_save_kwargs` (peft's conversion)."""
    folder = tempfile.TemporaryDirectory(prefix="tunesmith-initial-adapter-")
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(folder.name, safe_serialization=True)
    finally:
        config.init_lora_weights = init
    _INITIAL_ADAPTERS[peft_model] = folder


def adapter_save_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra `save_pretrained` arguments for `model`.

    New special tokens: their trained rows are saved (peft's trainable tokens), not the whole embedding.
    PiSSA and OLoRA rewrite the base weights they start from. Saved as they train, their adapter would
    need that rewritten base; peft converts it instead into a plain LoRA of rank 2r that applies to
    the unchanged base, given the adapter as it was initialised."""
    kwargs: dict[str, Any] = {}
    folder = _INITIAL_ADAPTERS.get(model)
    if folder is not None:
        kwargs["path_initial_model_for_weight_conversion"] = folder.name
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and getattr(config, "trainable_token_indices", None):
        # The new tokens' rows are in the adapter; without this peft also saves the whole resized embedding.
        kwargs["save_embedding_layers"] = False
    return kwargs


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder: Any = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"adapter type 'freeze': cannot find the decoder layers of {type(model).__name__}")
    return layers


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place ("regional" compilation); returns how many.

    The layers share one code path, so they share one compiled graph: compiling takes a layer's
    time, not the model's (about 40 s instead of 130 s for the default model on 2 CPU cores), and
    parameter names, hence checkpoints and saved adapters, stay as they were.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _apply_freeze(model: nn.Module, adapter: FreezeAdapter) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = decoder_layers(model)
    count = min(adapter.trainable_layers or 0, len(layers))
    for layer in list(layers)[len(layers) - count :]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)
    for name, parameter in model.named_parameters():
        if any(fragment in name for fragment in adapter.trainable_modules):
            parameter.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "adapter type 'freeze': nothing is left to train (raise trainable_layers or add modules)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied parameters once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
