"""`tunesmith export --merge`: one standalone model directory that plain transformers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.infer.loading import load_for_inference
from tunesmith.models.save import save_model_dir

PROBE = [{"role": "user", "content": "Write one sentence about the sea."}]


class ExportMismatch(RuntimeError):
    pass


def _probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(**ids).logits.float()


def export_run(run_dir: Path, out: Path, merge: bool = True, tolerance: float = 1e-3) -> Path:
    """Write safetensors + tokenizer (with its chat template); a merged LoRA is checked against the adapter."""
    model, tokenizer = load_for_inference(str(run_dir))
    is_adapter = hasattr(model, "merge_and_unload")
    if is_adapter and not merge:
        raise ValueError("this run holds a LoRA adapter: pass --merge to fold it into the base weights")
    if is_adapter:
        before = _probe_logits(model, tokenizer)
        model = model.merge_and_unload()
        difference = float((_probe_logits(model, tokenizer) - before).abs().max())
        if difference > tolerance:
            raise ExportMismatch(
                f"merged model differs from the adapter model (max logit difference {difference})"
            )
    return save_model_dir(model, tokenizer, out)
