"""Supervised fine-tuning: next-token loss on the trained (by default: assistant) tokens."""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config.schema import RunConfig
from tunesmith.data.build import BuiltData, build_data
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import BatchStream, StreamingBatchStream
from tunesmith.training.losses import CausalLMWithLoss
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.resume_policy import files_fingerprint, samples_fingerprint


class SFT:
    name = "sft"
    unit = "token"
    zero_gradient_is_normal = False

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData:
        """Samples in memory, or (data.streaming) rows read block by block as training goes."""
        if cfg.data.streaming:
            from tunesmith.data.stream_build import build_streaming

            rows, eval_samples, report = build_streaming(cfg.data, tokenizer, self.name, cfg.train.seed)
            return PreparedData(BuiltData([], eval_samples, report), rows, files_fingerprint(cfg))
        data = build_data(cfg.data, tokenizer, self.name)
        return PreparedData(data, None, samples_fingerprint(data.train))

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        t, d = cfg.train, cfg.data
        block_mask = packed_mask_kind(attention)
        train: BatchSource = (
            StreamingBatchStream(prepared.stream_rows, t.batch_size, pad_id, d.packing, block_mask)
            if prepared.stream_rows is not None
            else BatchStream(
                prepared.data.train, t.batch_size, d.seq_len, pad_id, d.packing, t.seed, block_mask=block_mask
            )
        )
        evaluation = (
            BatchStream(
                prepared.data.eval,
                t.batch_size,
                d.seq_len,
                pad_id,
                d.packing,
                t.seed,
                shuffle=False,
                block_mask=block_mask,
            )
            if prepared.data.eval
            else None
        )
        return train, evaluation

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        return CausalLMWithLoss(model, cfg.train.loss_chunk_size)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        loss_sum, count = model(**batch)
        return LossOutput(loss_sum, count)
