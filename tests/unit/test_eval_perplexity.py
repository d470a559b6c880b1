"""Perplexity tasks: packed, masked like training, equal to a plain per-sample forward."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.config.schema import EvalTask
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.eval.perplexity import evaluate_perplexity, tokenized_items

CHATS = [
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Quill."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, the colour of grass in spring."},
    ],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend!"}],
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(model_dir: Path, attention: str = "sdpa") -> tuple[Any, Any]:
    from tunesmith.models.load import load_model, load_tokenizer

    return load_model(model_dir, attention=attention).eval(), load_tokenizer(model_dir)


def _reference(model: Any, samples: list[Any]) -> tuple[list[float], list[int], list[int]]:
    """Per sample, one unpadded HF forward with the full logits: (nll sum, argmax hits, count)."""
    out = ([], [], [])
    for s in samples:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1)
        targets = torch.tensor(s.labels[1:])
        keep = targets != IGNORE_INDEX
        picked = logp[keep].gather(1, targets[keep][:, None])[:, 0]
        out[0].append(float(-picked.sum()))
        out[1].append(int((logp[keep].argmax(-1) == targets[keep]).sum()))
        out[2].append(int(keep.sum()))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_packed_perplexity_equals_per_sample_forward(arch, tiny_model_dirs, tmp_path):
    model, tokenizer = _load(tiny_model_dirs[arch])
    task = EvalTask.model_validate(
        f"perplexity:{_write(tmp_path / 'chat.jsonl', [{'messages': c} for c in CHATS])}"
    )
    result = evaluate_perplexity(model, tokenizer, task, log_samples=True)
    samples, owners, _ = tokenized_items(tokenizer, task, None, 2048)
    assert owners == [0, 1, 2]
    nll, hits, counts = _reference(model, samples)
    # only assistant replies are scored: the masks are the training masks, not all tokens
    assert all(0 < c < len(s.input_ids) - 1 for c, s in zip(counts, samples, strict=True))
    assert result.n == 3
    assert result.per_item["tokens"] == [float(c) for c in counts]
    for got, s, c in zip(result.per_item["nll"], nll, counts, strict=True):
        assert got == pytest.approx(s / c, abs=1e-4)
    assert result.metrics["nll"] == pytest.approx(sum(nll) / sum(counts), abs=1e-4)
    assert result.metrics["ppl"] == pytest.approx(math.exp(sum(nll) / sum(counts)), rel=1e-4)
    assert result.metrics["token_acc"] == pytest.approx(sum(hits) / sum(counts))
    assert [s["tokens"] for s in result.samples] == counts
    # the kernel the model was loaded with is back after the packed forward
    assert model.config._attn_implementation == "sdpa"


def test_block_mask_fallback_gives_the_same_numbers(tiny_model_dirs, tmp_path):
    """Eager keeps its kernel only if switching fails; either way packed samples stay isolated."""
    model, tokenizer = _load(tiny_model_dirs["llama"], attention="eager")
    task = EvalTask(
        kind="perplexity", path=str(_write(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS]))
    )
    from tunesmith.eval import perplexity

    samples, _, _ = tokenized_items(tokenizer, task, None, 2048)
    nll, _, counts = _reference(model, samples)
    original = perplexity.packed_attention

    import contextlib

    @contextlib.contextmanager
    def no_switch(m):
        yield "additive"

    perplexity.packed_attention = no_switch
    try:
        result = evaluate_perplexity(model, tokenizer, task)
    finally:
        perplexity.packed_attention = original
    assert result.metrics["nll"] == pytest.approx(sum(nll) / sum(counts), abs=1e-4)


def test_all_tokens_scores_the_prompt_too(tiny_model_dirs, tmp_path):
    model, tokenizer = _load(tiny_model_dirs["llama"])
    path = str(_write(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS]))
    masked = evaluate_perplexity(model, tokenizer, EvalTask(kind="perplexity", path=path))
    every = evaluate_perplexity(model, tokenizer, EvalTask(kind="perplexity", path=path, all_tokens=True))
    samples, _, _ = tokenized_items(
        tokenizer, EvalTask(kind="perplexity", path=path, all_tokens=True), None, 2048
    )
    assert every.per_item["tokens"] == [float(len(s.input_ids) - 1) for s in samples]
    nll, _, counts = _reference(model, samples)
    assert every.metrics["nll"] == pytest.approx(sum(nll) / sum(counts), abs=1e-4)
    assert every.metrics["nll"] != pytest.approx(masked.metrics["nll"], abs=1e-3)


def test_text_rows_split_into_windows_stay_one_item(tiny_model_dirs, tmp_path):
    model, tokenizer = _load(tiny_model_dirs["llama"])
    rows = [{"text": "one two three four five six seven eight nine ten " * 6}, {"text": "A short line."}]
    task = EvalTask(kind="perplexity", path=str(_write(tmp_path / "t.jsonl", rows)))
    result = evaluate_perplexity(model, tokenizer, task, seq_len=16)
    samples, owners, _ = tokenized_items(tokenizer, task, None, 16)
    assert len(samples) > 2 and result.n == 2 and owners[0] == owners[1] == 0
    nll, _, counts = _reference(model, samples)
    first = [i for i, o in enumerate(owners) if o == 0]
    assert result.per_item["nll"][0] == pytest.approx(
        sum(nll[i] for i in first) / sum(counts[i] for i in first), abs=1e-4
    )


def test_alpaca_rows_and_limit(tiny_model_dirs, tmp_path):
    model, tokenizer = _load(tiny_model_dirs["llama"])
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(5)]
    task = EvalTask(kind="perplexity", path=str(_write(tmp_path / "a.jsonl", rows)), limit=3)
    assert evaluate_perplexity(model, tokenizer, task).n == 3


def test_lora_model_is_scored_with_its_adapter(tiny_model_dirs, tmp_path):
    """A PeftModel (how a LoRA run loads) goes through the same packed path, adapter active."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(tiny_model_dirs["llama"])
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora).eval()
    task = EvalTask(
        kind="perplexity", path=str(_write(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS]))
    )
    samples, _, _ = tokenized_items(tokenizer, task, None, 2048)
    nll, _, counts = _reference(peft_model, samples)
    result = evaluate_perplexity(peft_model, tokenizer, task)
    assert result.metrics["nll"] == pytest.approx(sum(nll) / sum(counts), abs=1e-4)
    with peft_model.disable_adapter():
        base_nll, _, _ = _reference(peft_model, samples)
    assert sum(base_nll) != pytest.approx(sum(nll), abs=1e-2)  # the adapter changes the numbers
