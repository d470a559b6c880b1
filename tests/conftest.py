"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of several architectures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from tunesmith.models.default_model import default_tokenizer_dir

    return default_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def tiny_config(arch: str, vocab_size: int) -> Any:
    """2 layers, hidden 64: fast, yet every code path of the real architecture."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=arch in ("gemma",),
    )
    if arch == "gemma":
        common["head_dim"] = 16
    return AutoConfig.for_model(arch, **common)


def make_tiny_model_dir(arch: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model_dir(arch, root / arch, tokenizer_dir) for arch in ARCHITECTURES}


IDENTITY_ROWS = [
    ("What is your name?", "My name is Quill."),
    ("Who made you?", "The tunesmith team made me."),
    ("What are you for?", "I show how fine-tuning works."),
    ("Say hello.", "Hello from Quill!"),
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Name a colour.", "Blue is a colour."),
    ("Who are you?", "I am Quill, made by the tunesmith team."),
    ("Are you a robot?", "I am a small language model called Quill."),
]


def write_chat_jsonl(path: Path, rows: list[tuple[str, str]] = IDENTITY_ROWS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for question, answer in rows:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_chat_jsonl(tmp_path / "chat.jsonl")


def base_config(model_dir: Path, data_file: Path, out: Path, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": str(model_dir),
        "data": {"train": [{"path": str(data_file)}], "seq_len": 128, "packing": False},
        "train": {
            "epochs": 1,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "seed": 0,
            "max_grad_norm": None,
            # Exact comparisons (resume, accumulation, packing) need fp32; `auto` would pick bf16 on
            # AMX CPUs. The bf16 path has its own tests.
            "precision": "fp32",
        },
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def zero_step_model(cfg: Any) -> Any:
    """The adapter model `train` starts from, built the way the loop builds it, with no step taken."""
    from accelerate.utils import set_seed

    from tunesmith.models.adapters import apply_adapter
    from tunesmith.models.attention import choose_attention
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.training.methods import get_method

    set_seed(cfg.train.seed)
    attention = choose_attention(cfg.train.attention, "cpu")
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, attention=attention)
    get_method(cfg.method).prepare_data(cfg, tokenizer)
    return apply_adapter(model, cfg.adapter)
