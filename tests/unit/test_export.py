"""Export round trip: the merged model, loaded by plain transformers, matches the model that was trained.

It is compared twice: with the adapter reloaded from disk (what `export` itself checks) and with the
trained model object as it left the training loop, before anything was saved or reloaded, so that a
saving, reloading or merging bug cannot hide behind a second copy of itself.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.export.merge import export_run
from tunesmith.infer.loading import load_for_inference
from tunesmith.training.loop import train

PROMPT = [{"role": "user", "content": "What is your name?"}]
FP32_ATOL = 1e-4
# After a bf16 run the trained model's frozen base weights are bf16-rounded (precision.py), while the
# export merges into the fp32 base on disk; that rounding moves these logits by up to ~2e-3. A merge
# with the adapter scaled 10% wrong moves them by 2e-2 or more.
BF16_ATOL = 5e-3


def _train(arch: str, precision: str, tiny_model_dirs, chat_file, run, epochs: int = 2) -> Any:
    cfg = load_config(
        base_config(
            tiny_model_dirs[arch],
            chat_file,
            run,
            adapter={"type": "lora", "r": 8},
            train={"epochs": epochs, "lr": 2e-2, "precision": precision},
        )
    )
    return train(cfg, show_progress=False).model.eval()


def _logits(model: Any, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits.float()


def _prompt_ids(tokenizer: Any) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _wrongly_merged(trained: Any, scale: float = 1.1) -> Any:
    """The trained adapter merged with its update scaled by `scale`: what a merge bug would export."""
    wrong = copy.deepcopy(trained)
    with torch.no_grad():
        for name, parameter in wrong.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    return wrong.merge_and_unload()


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_merged_export_matches_adapter_logits(arch, tiny_model_dirs, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    trained = _train(arch, "fp32", tiny_model_dirs, chat_file, run)
    adapter_model, tokenizer = load_for_inference(str(run))
    out = export_run(run, tmp_path / "merged", merge=True)

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    ids = _prompt_ids(merged_tokenizer)
    expected = _logits(adapter_model, ids)
    got = _logits(merged, ids)
    in_memory = _logits(trained, ids)
    base = _logits(load_for_inference(str(tiny_model_dirs[arch]))[0], ids)
    assert _max_difference(in_memory, base) > 1e-3  # training changed the model, so the check has teeth
    torch.testing.assert_close(got, expected, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(got, in_memory, rtol=0, atol=FP32_ATOL)
    assert _max_difference(_logits(_wrongly_merged(trained), ids), in_memory) > 10 * FP32_ATOL


def test_merged_export_after_a_bf16_run_matches_the_trained_model(tiny_model_dirs, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    trained = _train("llama", "bf16", tiny_model_dirs, chat_file, run, epochs=1)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}  # restored after training
    out = export_run(run, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32

    ids = _prompt_ids(AutoTokenizer.from_pretrained(out))
    in_memory = _logits(trained, ids)
    got = _logits(merged, ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval(), ids)
    assert _max_difference(in_memory, base) > 100 * BF16_ATOL
    torch.testing.assert_close(got, in_memory, rtol=0, atol=BF16_ATOL)
    assert _max_difference(_logits(_wrongly_merged(trained), ids), in_memory) > 2 * BF16_ATOL


def test_export_without_merge_of_an_adapter_run_is_refused(tiny_model_dirs, chat_file, tmp_path):
    run = tmp_path / "run"
    train(load_config(base_config(tiny_model_dirs["llama"], chat_file, run)), show_progress=False)
    with pytest.raises(ValueError, match="--merge"):
        export_run(run, tmp_path / "out", merge=False)
