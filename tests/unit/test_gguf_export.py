"""GGUF export round trips: every type, the four architectures, read back by gguf's own reader and by
transformers' GGUF loader, whose logits must match the model that was written; the K-quant encoders
round-tripped through gguf's own dequantizers.

llama.cpp itself (llama-cpp-python 0.3.36, built from source: too slow for every run) was checked by
hand on the same files: for all four architectures and f32/q8_0/q4_0/q4_k_m/q6_k its token ids equal
the tokenizer's, it finds the end-of-turn token, and its logits match the rounded model to KL < 3e-5.

The models here are tiny (2 layers, hidden 64, every matrix's rows a multiple of the 32-value
quantization block) and use a tiny byte-level BPE tokenizer (320 tokens, ChatML special tokens):
reading the 49,152-token SmolLM2 vocabulary back from a GGUF costs transformers ~10 s per file, so
the real tokenizer gets one round trip of its own (`test_the_smollm2_tokenizer_...`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunesmith.export.gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from tunesmith.export.gguf_writer import TYPES, UnsupportedGGUFType, check_type, write_gguf
from tunesmith.export.verify import CRITERIA, logit_metrics

ARCHS = ("llama", "qwen2", "mistral", "gemma3_text")
BLOCK_TYPES = tuple(t for t in TYPES if "_k" not in t)
K_MIXES = ("q4_k_m", "q5_k_m", "q6_k")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is your name? My name is Quill, made by the tunesmith team.",
    "Hello from Quill! 2 + 2 is 4. Blue is a colour.",
    "Write one sentence about the sea. The sea is wide and blue, and the waves are loud.",
]
PROMPT = [{"role": "user", "content": "Hello there, what is 12 + 7? The sea is wide."}]


# --- tiny tokenizers and models (shared with test_export_verify.py) ----------------------------------


def tiny_tokenizer(folder: Path, template: str = CHATML, eos: str = "<|im_end|>") -> Any:
    """A byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few sentences, with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token=eos,
        unk_token="<|endoftext|>",
        pad_token=eos,
    )
    fast.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def sentencepiece_style_tokenizer(folder: Path) -> Any:
    """A BPE with byte fallback and a '▁' prefix (how Llama 2 / Mistral / Gemma tokenizer.json look)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    first = Tokenizer(models.BPE())
    first.normalizer = normalizer
    first.train_from_iterator(TEXT * 10, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(first.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([*specials, "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """Rows of every matrix a multiple of 32. Gemma 3 gets head_dim = query_pre_attn_scalar = 256, the
    relation of the real models that llama.cpp assumes and transformers' GGUF reader defaults to."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=arch in ("qwen2", "gemma3_text"),
    )
    if arch == "gemma3_text":
        common.update(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256)
        common.update(sliding_window=128)
    return AutoConfig.for_model(arch, **{**common, **overrides})


def tiny_model_dir(
    arch: str, folder: Path, tokenizer_factory: Any = tiny_tokenizer, seed: int = 0, **config: Any
) -> Path:
    """A random tiny model whose norms and biases are not at their init values (ones, zeros), so that a
    missing +1 offset or bias is visible in the logits."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_factory(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **config), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder: Path) -> tuple[Any, Any]:
    from tunesmith.models.load import load_model, load_tokenizer

    return load_model(folder).eval(), load_tokenizer(folder)


def read_gguf(path: Path) -> tuple[Any, Any]:
    """transformers' own GGUF reader, from a folder holding only the file (no tokenizer files beside)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-tiny")
    return {arch: tiny_model_dir(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hidden 256, intermediate 512: rows that fill K-quant super-blocks (256 values)."""
    root = tmp_path_factory.mktemp("gguf-wide")
    return {arch: tiny_model_dir(arch, root / arch, hidden_size=256, intermediate_size=512) for arch in ARCHS}


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", BLOCK_TYPES + K_MIXES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_gguf_reader_and_transformers(arch, type_name, models, wide_models, tmp_path):
    from gguf import GGUFReader

    model, tokenizer = load((wide_models if type_name in K_MIXES else models)[arch])
    out = tmp_path / f"{arch}-{type_name}.gguf"
    written = write_gguf(model, tokenizer, out, type_name, chat_template=CHATML, eot_id=2)
    assert out.is_file() and not list(tmp_path.glob(".*partial"))

    reader = GGUFReader(out)
    assert _field(reader, "general.architecture") == {"gemma3_text": "gemma3", "mistral": "llama"}.get(
        arch, arch
    )
    assert _field(reader, "tokenizer.chat_template") == CHATML
    assert _field(reader, "tokenizer.ggml.eot_token_id") == 2
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert ("output.weight" in types) == (not model.config.tie_word_embeddings)
    assert all(types[name] == "f32" for name in types if name.endswith(("_norm.weight", ".bias")))
    output = "output.weight" if "output.weight" in types else "token_embd.weight"
    if type_name in K_MIXES:  # llama-quantize's mix: q6_k for the output and where use_more_bits says
        assert types[output] == "q6_k" and types["blk.1.ffn_down.weight"] == "q6_k"
        assert types["blk.0.ffn_gate.weight"] == types["blk.0.ffn_down.weight"] == type_name[:4]
    else:
        narrow = type_name in ("q4_0", "q4_1", "q5_0", "q5_1")
        assert types[output] == ("q8_0" if narrow else type_name)
        assert types["blk.0.ffn_down.weight"] == type_name
    assert sum(written.tensor_types.values()) == len(types)
    del reader

    exported, gguf_tokenizer = read_gguf(out)
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    again = gguf_tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert again["input_ids"].tolist() == ids["input_ids"].tolist()
    metrics = logit_metrics([logits(model, ids["input_ids"])], [logits(exported, ids["input_ids"])])
    criteria = CRITERIA[type_name]
    if criteria.max_rel_diff is not None:
        assert metrics["max_rel_diff"] <= criteria.max_rel_diff, metrics
    if criteria.max_kl is not None:
        assert metrics["mean_kl"] <= criteria.max_kl, metrics
    if type_name == "f32":
        assert metrics["max_abs_diff"] == 0.0  # no arithmetic on the way: a bit-exact round trip


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_layout_conversions_are_needed(arch, models, tmp_path, monkeypatch):
    """Without llama's q/k permutation or gemma3's +1 on norms the file still loads, with other logits."""
    from tunesmith.export import gguf_arch

    model, tokenizer = load(models[arch])
    ids = tokenizer("The sea is wide and blue.", return_tensors="pt")["input_ids"]
    monkeypatch.setitem(gguf_arch.ARCHS, arch, gguf_arch.ArchSpec(arch, gguf_arch.ARCHS[arch].gguf_arch))
    write_gguf(model, tokenizer, tmp_path / "wrong.gguf", "f32", chat_template=CHATML, eot_id=2)
    metrics = logit_metrics([logits(model, ids)], [logits(read_gguf(tmp_path / "wrong.gguf")[0], ids)])
    assert metrics["max_rel_diff"] > 10 * CRITERIA["f32"].max_rel_diff, metrics  # the check fails it


def test_rows_that_do_not_fill_a_block_fall_back_to_f16(tmp_path):
    """intermediate_size 80: ffn_down's rows (80 values) do not divide into 32-value blocks."""
    from gguf import GGUFReader

    model, tokenizer = load(tiny_model_dir("llama", tmp_path / "model", intermediate_size=80))
    written = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0", chat_template=CHATML, eot_id=2)
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_gate.weight"] == "Q4_0"
    assert any("blk.0.ffn_down.weight" in line and "f16" in line for line in written.fallbacks)
    ids = tokenizer("The sea is wide.", return_tensors="pt")["input_ids"]
    metrics = logit_metrics([logits(model, ids)], [logits(read_gguf(tmp_path / "m.gguf")[0], ids)])
    assert metrics["mean_kl"] <= CRITERIA["q4_0"].max_kl


def test_a_sentencepiece_style_tokenizer_round_trips(tmp_path):
    """Byte-fallback BPE -> tokenizer.ggml.model 'llama' with BYTE tokens, scores and merges.

    Not compared: text that starts with a space, holds runs of spaces or follows a special token,
    where transformers' GGUF reader (a Metaspace pre-tokenizer that prepends '▁' to each piece) and
    this hand-built tokenizer (a Prepend normalizer) differ."""
    from gguf import GGUFReader

    model, tokenizer = load(tiny_model_dir("llama", tmp_path / "model", sentencepiece_style_tokenizer))
    out = tmp_path / "gguf" / "m.gguf"
    write_gguf(
        model,
        tokenizer,
        out,
        "f16",
        chat_template=CHATML,
        eot_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    reader = GGUFReader(out)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[3:259] == [6] * 256  # <0x00>..<0xFF> are BYTE tokens
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    _, gguf_tokenizer = read_gguf(out)
    for text in ["Hello world", "The sea is wide. ¿Qué? 🚀 12345", "a\nb"]:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert gguf_tokenizer.chat_template == CHATML


def test_the_smollm2_tokenizer_round_trips(tokenizer_dir, tmp_path):
    """The real 49,152-token vocabulary: llama.cpp's 'smollm' pre-tokenizer, ids and template intact."""
    from gguf import GGUFReader

    from conftest import make_tiny_model_dir

    model, tokenizer = load(make_tiny_model_dir("llama", tmp_path / "model", tokenizer_dir))
    out = tmp_path / "gguf" / "m.gguf"
    written = write_gguf(model, tokenizer, out, "f16", chat_template=tokenizer.chat_template, eot_id=2)
    assert written.notes == []
    reader = GGUFReader(out)
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert len(reader.get_field("tokenizer.ggml.merges").data) > 40_000
    del reader
    exported, gguf_tokenizer = read_gguf(out)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?  ¿Qué tal? 🚀"},
        {"role": "assistant", "content": "42."},
    ]
    rendered = tokenizer.apply_chat_template(conversation, return_dict=False)
    assert gguf_tokenizer.apply_chat_template(conversation, return_dict=False) == rendered
    ids = torch.tensor([rendered])
    metrics = logit_metrics([logits(model, ids)], [logits(exported, ids)])
    assert metrics["max_rel_diff"] <= CRITERIA["f16"].max_rel_diff


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q4_k_s", "Q5_K_S", "q3_k_m", "iq4_xs"])
def test_other_k_quants_are_refused_with_the_supported_types_and_llama_quantize(name):
    with pytest.raises(UnsupportedGGUFType) as caught:
        check_type(name)
    message = str(caught.value)
    assert all(t in message for t in TYPES) and "llama-quantize" in message and "f16" in message


def test_an_unknown_type_names_the_supported_ones():
    with pytest.raises(UnsupportedGGUFType, match="supported: f32, f16, bf16, q8_0, q4_0"):
        check_type("q3")
    assert check_type("Q8_0") == "q8_0"


def test_an_unsupported_architecture_is_refused(tmp_path, tokenizer_dir):
    from conftest import make_tiny_model_dir
    from tunesmith.export.gguf_arch import UnsupportedModel

    model, tokenizer = load(make_tiny_model_dir("phi3", tmp_path / "phi3", tokenizer_dir))
    with pytest.raises(UnsupportedModel, match="llama, mistral, qwen2 and gemma3.*'phi3'.*--merge"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", chat_template=None, eot_id=None)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    ("name", "encoder", "bound"),
    [("Q6_K", quantize_q6_k, 0.05), ("Q5_K", quantize_q5_k, 0.08), ("Q4_K", quantize_q4_k, 0.15)],
)
def test_k_quant_encoders_round_trip_through_gguf_dequantize(name, encoder, bound):
    """Every 256-value super-block comes back with the error 6 / 5 / 4 bits give (a byte in the wrong
    place would put values in other positions: errors of the order of the values), zeros stay zero."""
    from gguf import GGMLQuantizationType, dequantize

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 2, (16, 1))).astype(np.float32)
    weights[3, 7], weights[5] = 9.0, 0.0
    weights[7] += 1.0  # an offset: Q4_K's min matters
    encoded = encoder(weights)
    assert encoded.dtype == np.uint8 and encoded.shape == (
        16,
        2 * {"Q6_K": 210, "Q5_K": 176, "Q4_K": 144}[name],
    )
    back = dequantize(encoded, GGMLQuantizationType[name]).reshape(weights.shape)
    assert (back[5] == 0).all()
    blocks, got = weights.reshape(-1, 256), back.reshape(-1, 256)
    norms = np.linalg.norm(blocks, axis=-1)
    errors = np.linalg.norm(got - blocks, axis=-1)
    assert (errors <= bound * norms + 1e-6).all(), (errors / np.maximum(norms, 1e-9)).max()
