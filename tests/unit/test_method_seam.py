"""The loop is method-agnostic: a method's metrics reach metrics.jsonl as means over its loss units."""

from __future__ import annotations

import json

import pytest

from conftest import base_config
from tunesmith.config.load import load_config
from tunesmith.training import loop
from tunesmith.training.methods.base import LossOutput
from tunesmith.training.methods.sft import SFT


class ProbeSFT(SFT):
    """SFT that also reports its loss twice over and its unit count, as sums over its units."""

    def compute_loss(self, model, batch):
        out = super().compute_loss(model, batch)
        return LossOutput(
            out.loss_sum, out.count, {"twice_loss": 2 * out.loss_sum.detach(), "ones": out.count}
        )


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_method_metrics_are_logged_as_unit_means(
    grad_accum, tiny_model_dirs, chat_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "get_method", lambda name: ProbeSFT())
    cfg = base_config(
        tiny_model_dirs["llama"],
        chat_file,
        tmp_path / "run",
        train={"batch_size": 1, "grad_accum": grad_accum},
    )
    result = loop.train(load_config(cfg), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == result.steps >= 2
    for row in steps:
        assert row["twice_loss"] == pytest.approx(2 * row["loss"], rel=1e-6)
        assert row["ones"] == pytest.approx(1.0)
