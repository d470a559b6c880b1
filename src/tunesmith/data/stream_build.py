"""Config -> a streaming source of packed training rows plus in-memory eval samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.config.schema import DataConfig
from tunesmith.data.batch_tokenize import TokenizeResult, tokenize_chunk
from tunesmith.data.build import (
    DataReport,
    FingerprintedTokenizer,
    load_source,
    source_template,
    tokenize_settings,
)
from tunesmith.data.conversation import Sample
from tunesmith.data.errors import DataError
from tunesmith.data.sources import resolve_files
from tunesmith.data.streaming import StreamingRows
from tunesmith.data.tokenize import TokenizedSample


def build_streaming(
    cfg: DataConfig, tokenizer: Any, method: str, seed: int
) -> tuple[StreamingRows, list[TokenizedSample], DataReport]:
    if cfg.eval_split > 0:
        raise DataError(
            "data.streaming cannot hold out data.eval_split (the data is never all read): "
            "set data.eval to a held-out file instead"
        )
    report = DataReport()
    settings = tokenize_settings(cfg, tokenizer, method)
    tok = FingerprintedTokenizer(tokenizer)
    evaluation = [
        sample
        for i, source in enumerate(cfg.eval)
        for sample in load_source(source, f"data.eval[{i}]", cfg, tok, settings, report).samples
    ]
    files: list[tuple[Path, str]] = []
    templates: list[str | None] = []
    for i, source in enumerate(cfg.train):
        label = f"data.train[{i}]"
        template = source_template(source, label, cfg, tokenizer, method)
        for path in resolve_files(source.path, label):
            files.append((path, source.format))
            templates.append(template)

    def tokenize(samples: list[Sample], file_index: int) -> TokenizeResult:
        return tokenize_chunk(samples, tokenizer, templates[file_index], settings)

    rows = StreamingRows(
        files,
        tokenize,
        cfg.seq_len,
        cfg.packing,
        cfg.stream_block_rows,
        seed,
        cfg.on_error,
        report=report,
        max_dropped_fraction=cfg.max_dropped_fraction,
    )
    return rows, evaluation, report
