"""Model sources: local directories, GGUF files, and clear errors for what is not on this machine."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.conversation import RowRef
from tunesmith.data.packing import collate_packed
from tunesmith.data.tokenize import TokenizedSample
from tunesmith.models.attention import choose_attention, needs_block_mask
from tunesmith.models.load import ModelNotFound, resolve_model_dir


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


def test_attention_choice_on_cpu_uses_sdpa_with_block_masks():
    assert choose_attention("auto", "cpu") == "sdpa"
    assert needs_block_mask("sdpa") and needs_block_mask("eager")
    assert not needs_block_mask("flash_attention_2")
    with pytest.raises(ValueError, match="flash-attn"):
        choose_attention("flash_attention_2", "cpu")


def test_varlen_collate_carries_boundaries_in_position_ids_only():
    rows = [
        [
            TokenizedSample([5, 6, 7], [5, 6, 7], RowRef("m", 1)),
            TokenizedSample([8, 9], [8, 9], RowRef("m", 2)),
        ]
    ]
    batch = collate_packed(rows, pad_id=0, block_mask=False)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    torch.testing.assert_close(batch["labels"], collate_packed(rows, pad_id=0)["labels"])
