"""Model sources: local directories, GGUF files, and clear errors for what is not on this machine."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.models.attention import choose_attention, packed_mask_kind
from tunesmith.models.load import ModelNotFound, resolve_model_dir
from tunesmith.models.varlen_attention import NAME as VARLEN_SDPA


def test_hub_id_that_is_not_cached_says_offline_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFound) as caught:
        resolve_model_dir("someorg/some-model")
    message = str(caught.value)
    assert "never downloads" in message and "hf download someorg/some-model" in message


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        resolve_model_dir(str(tmp_path / "model.gguf"))


def test_local_model_directory_resolves_to_itself(tiny_model_dirs):
    assert resolve_model_dir(str(tiny_model_dirs["llama"])) == tiny_model_dirs["llama"]


def test_attention_choice_on_cpu_is_per_sample_sdpa_without_masks():
    assert choose_attention("auto", "cpu") == VARLEN_SDPA
    assert choose_attention("varlen_sdpa", "cpu") == VARLEN_SDPA
    assert choose_attention("sdpa", "cpu") == "sdpa"
    assert packed_mask_kind("sdpa") == "bool" and packed_mask_kind("eager") == "additive"
    assert packed_mask_kind("flash_attention_2") == packed_mask_kind(VARLEN_SDPA) == "none"
    assert choose_attention("flex_attention", "cuda") == "flex_attention"
    with pytest.raises(ValueError, match="flex_attention cannot train on a CPU.*use varlen_sdpa"):
        choose_attention("flex_attention", "cpu")
    with pytest.raises(ValueError, match="flash-attn"):
        choose_attention("flash_attention_2", "cpu")


def test_varlen_collate_carries_boundaries_in_position_ids_only():
    rows = [
        [
            TokenizedSample([5, 6, 7], [5, 6, 7], RowRef("m", 1)),
            TokenizedSample([8, 9], [8, 9], RowRef("m", 2)),
        ]
    ]
    batch = collate_packed(rows, pad_id=0, block_mask="none")
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    torch.testing.assert_close(batch["labels"], collate_packed(rows, pad_id=0)["labels"])
