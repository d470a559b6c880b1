"""The LoRA family and QLoRA: each option trains a tiny model, starts where peft's own initialisation
starts, and saves an adapter that peft alone loads back to the same logits.

References are independent of `tunesmith.models.adapters`: peft's `LoraConfig` written out by hand
with the same seed (initialisation), a fresh base + `PeftModel.from_pretrained` (saving), and the
plain-LoRA run on the same data (QLoRA's loss).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from conftest import IDENTITY_ROWS, base_config, write_chat_jsonl
from tunesmith.config.schema import LoraAdapter, QloraAdapter, RunConfig
from tunesmith.models.adapters import adapter_save_kwargs, apply_adapter
from tunesmith.models.load import load_model, load_tokenizer

STEPS = 25
LR = 1e-2


def _config(**adapter: Any) -> LoraAdapter:
    cfg = RunConfig.model_validate({"adapter": adapter, "data": {"train": [{"path": "x.jsonl"}]}})
    return cfg.adapter  # type: ignore[return-value]


def _batch(tokenizer: Any, extra: str = "") -> torch.Tensor:
    texts = [f"{q} {a}{extra}" for q, a in IDENTITY_ROWS[:4]]
    ids = [tokenizer(t)["input_ids"][:24] for t in texts]
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


def _train(model: Any, batch: torch.Tensor, steps: int = STEPS) -> list[float]:
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# --- the LoRA options: same init as peft, falling loss, a normal peft adapter -----------------------------

VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (tunesmith adapter section, the peft LoraConfig fields it must mean)
    "dora": ({"r": 8, "dora": True}, {"use_dora": True}),
    "rslora": ({"r": 8, "rslora": True}, {"use_rslora": True}),
    "gaussian": ({"r": 8, "init": "gaussian"}, {"init_lora_weights": "gaussian"}),
    "pissa": ({"r": 8, "init": "pissa"}, {"init_lora_weights": "pissa"}),
    "pissa_niter": ({"r": 8, "init": "pissa", "pissa_niter": 4}, {"init_lora_weights": "pissa_niter_4"}),
    "olora": ({"r": 8, "init": "olora"}, {"init_lora_weights": "olora"}),
    "regex": (
        {"r": 8, "targets": r".*\.self_attn\.(q_proj|v_proj)"},
        {"target_modules": r".*\.self_attn\.(q_proj|v_proj)"},
    ),
    "patterns": (
        {"r": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 32}},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 32}},
    ),
    "modules_to_save": ({"r": 8, "modules_to_save": ["lm_head"]}, {"modules_to_save": ["lm_head"]}),
}


def _peft_reference(model_dir: Path, fields: dict[str, Any]) -> Any:
    from peft import LoraConfig, get_peft_model

    config = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **fields}
    torch.manual_seed(0)
    return get_peft_model(load_model(model_dir), LoraConfig(**config))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_starts_as_peft_trains_and_reloads_with_peft_alone(
    name, tiny_model_dirs, tokenizer, tmp_path
):
    from peft import PeftModel

    model_dir = tiny_model_dirs["llama"]
    section, fields = VARIANTS[name]
    torch.manual_seed(0)
    model = apply_adapter(load_model(model_dir), _config(**section))
    reference = _peft_reference(model_dir, fields)
    ours, theirs = _lora_state(model), _lora_state(reference)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=1e-5, atol=1e-5)

    losses = _train(model, batch)
    assert losses[-1] < losses[0] - 0.5, losses
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter", **adapter_save_kwargs(model))
    reloaded = PeftModel.from_pretrained(load_model(model_dir), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=1e-4, atol=1e-4)


def test_rank_and_alpha_patterns_reach_the_modules(tiny_model_dirs):
    model = apply_adapter(load_model(tiny_model_dirs["llama"]), _config(**VARIANTS["patterns"][0]))
    attention = model.base_model.model.model.layers[0].self_attn
    assert attention.q_proj.lora_A["default"].weight.shape[0] == 2
    assert attention.q_proj.scaling["default"] == 32 / 2
    assert attention.k_proj.lora_A["default"].weight.shape[0] == 8
    assert attention.k_proj.scaling["default"] == 16 / 8


def test_a_regex_target_adapts_only_what_it_matches(tiny_model_dirs):
    model = apply_adapter(load_model(tiny_model_dirs["llama"]), _config(**VARIANTS["regex"][0]))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_pissa_saves_a_plain_lora_of_twice_the_rank_for_the_unchanged_base(tiny_model_dirs, tmp_path):
    model = apply_adapter(load_model(tiny_model_dirs["llama"]), _config(r=4, init="pissa"))
    model.save_pretrained(tmp_path / "a", **adapter_save_kwargs(model))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True


# --- QLoRA --------------------------------------------------------------------------------------------------


def _qlora_model(model_dir: Path, **section: Any) -> Any:
    adapter = _config(type="qlora", r=8, **section)
    torch.manual_seed(0)
    return apply_adapter(load_model(model_dir, adapter=adapter), adapter)


@pytest.mark.parametrize("section", [{}, {"quant_type": "fp4", "double_quant": False}, {"bits": 8}])
def test_qlora_trains_quantized_and_its_loss_is_close_to_lora(section, tiny_model_dirs, tokenizer, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    model_dir = tiny_model_dirs["llama"]
    model = _qlora_model(model_dir, **section)
    wanted = bnb.nn.Linear8bitLt if section.get("bits") == 8 else bnb.nn.Linear4bit
    base_layers = [m for m in model.modules() if type(m) is wanted]
    assert len(base_layers) == 14  # 7 linear layers x 2 decoder layers; the LM head stays full precision
    batch = _batch(tokenizer)
    torch.manual_seed(0)
    lora = apply_adapter(load_model(model_dir), _config(r=8))
    qlora_losses, lora_losses = _train(model, batch), _train(lora, batch)
    assert qlora_losses[-1] < qlora_losses[0] - 0.5, qlora_losses
    gap = abs(qlora_losses[-1] - lora_losses[-1]) / lora_losses[-1]
    assert gap < 0.01, (qlora_losses[-1], lora_losses[-1])  # measured: 0.02-0.05%

    trained = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    quantized_base = load_model(model_dir, adapter=_config(type="qlora", r=8, **section))
    reloaded = PeftModel.from_pretrained(quantized_base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=1e-4, atol=1e-4)


def test_qlora_on_a_model_loaded_in_full_precision_quantizes_it_the_same_way(tiny_model_dirs, tokenizer):
    model_dir = tiny_model_dirs["llama"]
    adapter = _config(type="qlora", r=8)
    torch.manual_seed(0)
    loaded_quantized = apply_adapter(load_model(model_dir, adapter=adapter), adapter)
    torch.manual_seed(0)
    quantized_after = apply_adapter(load_model(model_dir), adapter)
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(quantized_after, batch), _logits(loaded_quantized, batch))


def test_a_pre_quantized_checkpoint_loads_quantized(tiny_model_dirs, tokenizer, tmp_path):
    from tunesmith.models.quantization import checkpoint_quantization, is_quantized

    adapter = _config(type="qlora", r=8)
    model = load_model(tiny_model_dirs["llama"], adapter=adapter)
    model.save_pretrained(tmp_path / "q4")
    assert checkpoint_quantization(tmp_path / "q4")["load_in_4bit"] is True
    again = load_model(tmp_path / "q4")
    assert is_quantized(again)
    batch = _batch(tokenizer)
    torch.testing.assert_close(_logits(again, batch), _logits(model, batch))
    trained = apply_adapter(again, adapter)
    losses = _train(trained, batch)
    assert losses[-1] < losses[0] - 0.5, losses


def test_qlora_merge_dequantizes_a_pre_quantized_base(tiny_model_dirs, tokenizer, tmp_path):
    """The merged model is the de-quantized base + the adapter: 4-bit weights are not quantized again."""
    from tunesmith.export.merge import dequantized_adapter_model
    from tunesmith.models.quantization import is_quantized, load_dequantized

    adapter = _config(type="qlora", r=8)
    load_model(tiny_model_dirs["llama"], adapter=adapter).save_pretrained(tmp_path / "q4")
    model = apply_adapter(load_model(tmp_path / "q4"), adapter)
    batch = _batch(tokenizer)
    _train(model, batch, 5)
    plain = dequantized_adapter_model(model)
    assert not is_quantized(plain)
    expected = _logits(plain, batch)
    merged = plain.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-4, atol=1e-4)
    reference = load_dequantized(tmp_path / "q4")
    layer = merged.model.layers[0].self_attn.k_proj
    assert layer.weight.dtype == torch.float32
    assert not torch.equal(layer.weight, reference.model.layers[0].self_attn.k_proj.weight)  # merged in


# --- new special tokens --------------------------------------------------------------------------------------

NEW = ["<tool_call>", "<scratch>"]


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # untied and tied LM head
def test_new_special_tokens_grow_the_embedding_train_and_reload(
    arch, tiny_model_dirs, tokenizer_dir, tmp_path
):
    from peft import PeftModel

    model_dir = tiny_model_dirs[arch]
    tokenizer = load_tokenizer(tokenizer_dir)
    before = len(tokenizer)
    base = load_model(model_dir)
    old_rows = base.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    model = apply_adapter(base, _config(r=8, new_special_tokens=NEW), tokenizer)
    ids = tokenizer.convert_tokens_to_ids(NEW)
    assert ids == [before, before + 1] and len(tokenizer) == before + 2
    assert tokenizer.tokenize(f"a {NEW[0]} b").count(NEW[0]) == 1  # one token, not split
    batch = _batch(tokenizer, extra=f" {NEW[0]} {NEW[1]}")
    assert (batch == ids[0]).any() and (batch == ids[1]).any()

    def rows() -> torch.Tensor:
        with torch.no_grad():
            return model.get_input_embeddings()(torch.arange(before + 2)).detach().clone()

    start = rows()
    assert start.shape[0] == before + 2
    losses = _train(model, batch)
    assert losses[-1] < losses[0] - 0.5, losses
    end = rows()
    assert not torch.allclose(end[before:], start[before:])  # the new rows trained
    torch.testing.assert_close(end[:before], start[:before], rtol=0, atol=0)  # the old ones did not
    assert torch.equal(model.get_base_model().get_input_embeddings().weight[:before], old_rows)
    trained = _logits(model, batch)

    model.save_pretrained(tmp_path / "adapter", **adapter_save_kwargs(model))
    tokenizer.save_pretrained(tmp_path / "adapter")
    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert max(t.numel() for t in saved.values()) < 10 * 64 * len(
        NEW
    )  # the new rows, not the whole embedding
    reloaded_tokenizer = load_tokenizer(tmp_path / "adapter")
    assert reloaded_tokenizer.convert_tokens_to_ids(NEW) == ids
    fresh = load_model(model_dir)
    fresh.resize_token_embeddings(len(reloaded_tokenizer))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    again = torch.tensor(
        [reloaded_tokenizer(t)["input_ids"] for t in [reloaded_tokenizer.decode(r) for r in batch]]
    )
    assert torch.equal(again, batch)
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=0, atol=1e-5)


# --- config errors name the key and the fix ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"type": "qlora", "bits": 8, "quant_type": "fp4"}, "adapter.quant_type applies to adapter.bits: 4"),
        ({"type": "qlora", "init": "pissa"}, "use type: lora"),
        ({"targets": "(("}, "not a valid regex"),
        ({"rank_pattern": {"[": 4}}, "not a valid regex"),
        ({"pissa_niter": 4}, "adapter.pissa_niter applies to adapter.init: pissa"),
        ({"init": "olora", "dora": True}, "cannot be combined with adapter.dora"),
        ({"new_special_tokens": ["<a>", "<a>"]}, "distinct"),
        ({"lr_ratio": 0}, "adapter.lr_ratio: expected a positive number"),
    ],
)
def test_adapter_config_errors_name_the_key(section, words):
    from tunesmith.config.load import ConfigError, load_config

    with pytest.raises(ConfigError, match="adapter") as caught:
        load_config({"adapter": section, "data": {"train": [{"path": "x.jsonl"}]}})
    assert words in str(caught.value)


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    from tunesmith.config.load import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install 'tunesmith\[qlora\]'"):
        load_config({"adapter": {"type": "qlora"}, "data": {"train": [{"path": "x.jsonl"}]}})


def test_lr_ratio_is_read_from_the_adapter():
    assert _config(lr_ratio=16).lr_ratio == 16 and _config().lr_ratio is None
    assert isinstance(_config(type="qlora", lr_ratio=4), QloraAdapter)


# --- end to end through `tunesmith train` and `export --merge` --------------------------------------------


@pytest.mark.slow
def test_a_qlora_run_trains_saves_and_exports_merged(tiny_model_dirs, tmp_path):
    from tunesmith.config.load import load_config
    from tunesmith.export.merge import export_run
    from tunesmith.training.loop import train

    cfg = base_config(
        tiny_model_dirs["llama"],
        write_chat_jsonl(tmp_path / "chat.jsonl", [IDENTITY_ROWS[0]] * 8),
        tmp_path / "run",
        adapter={"type": "qlora", "r": 8},
        train={"epochs": 3, "lr": 2e-2},
    )
    result = train(load_config(cfg), show_progress=False)
    # One row repeated: every step sees the same batch, so the first and last losses compare.
    assert len(result.losses) == 12
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    out = export_run(tmp_path / "run", tmp_path / "merged", merge=True)  # its behaviour check passes
    from tunesmith.models.quantization import is_quantized

    assert not is_quantized(load_model(out))
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 8
