"""Export round trip: the merged model, loaded by plain transformers, matches the adapter model."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.export.merge import export_run
from tunesmith.infer.loading import load_for_inference
from tunesmith.training.loop import train


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_merged_export_matches_adapter_logits(arch, tiny_model_dirs, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    cfg = load_config(
        base_config(
            tiny_model_dirs[arch],
            chat_file,
            run,
            adapter={"type": "lora", "r": 8},
            train={"epochs": 2, "lr": 2e-2},
        )
    )
    train(cfg, show_progress=False)
    adapter_model, tokenizer = load_for_inference(str(run))
    out = export_run(run, tmp_path / "merged", merge=True)

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    ids = merged_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is your name?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = adapter_model(**ids).logits
        got = merged(**ids).logits
        base = load_for_inference(str(tiny_model_dirs[arch]))[0](**ids).logits
    assert (expected - base).abs().max() > 1e-3  # training changed the model, so the check has teeth
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_export_without_merge_of_an_adapter_run_is_refused(tiny_model_dirs, chat_file, tmp_path):
    run = tmp_path / "run"
    train(load_config(base_config(tiny_model_dirs["llama"], chat_file, run)), show_progress=False)
    with pytest.raises(ValueError, match="--merge"):
        export_run(run, tmp_path / "out", merge=False)
