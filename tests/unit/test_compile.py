"""`train.compile` compiles each decoder layer and learns exactly what the eager run learns."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training.loop import train


@pytest.mark.slow  # a one-off inductor compile: about a minute on 2 CPU cores
def test_compiled_layers_match_the_eager_run(tiny_model_dirs, chat_file, tmp_path):
    def run(compiled: bool):
        cfg = load_config(
            base_config(
                tiny_model_dirs["llama"],
                chat_file,
                tmp_path / str(compiled),
                adapter={"type": "lora", "r": 8, "alpha": 16},
                data={"train": [{"path": str(chat_file)}], "seq_len": 64, "packing": True},
                train={"epochs": 3, "batch_size": 2, "lr": 1e-2, "compile": compiled},
            )
        )
        return train(cfg, show_progress=False)

    eager, compiled = run(False), run(True)
    layers = compiled.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)  # it really compiled
    assert len(eager.losses) == len(compiled.losses) >= 3
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=0, atol=1e-4)
    for (name, a), (_, b) in zip(
        eager.model.named_parameters(), compiled.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
