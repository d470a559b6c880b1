"""`method: pretrain`: raw text in windows of seq_len, BOS as the tokenizer says, overlap honoured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import base_config, make_tiny_model_dir
from tunesmith.config.load import load_config
from tunesmith.config.schema import DataConfig
from tunesmith.data.build import build_data
from tunesmith.data.conversation import RowRef, TextSample
from tunesmith.data.errors import DataError
from tunesmith.data.tokenize import IGNORE_INDEX, bos_token_id, tokenize_text
from tunesmith.models.load import load_tokenizer
from tunesmith.training.loop import train

TEXT = (
    "The river runs past the old mill, where the miller grinds wheat into flour every morning. "
    "Children come to watch the wheel turn, and the miller tells them how water becomes bread. "
) * 4


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny llama whose saved tokenizer puts BOS in front of every text, as Llama's and Gemma's do."""
    from transformers import AutoTokenizer

    folder = make_tiny_model_dir("llama", tmp_path_factory.mktemp("bos") / "llama", tokenizer_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bos_tokenizer(bos_model_dir: Path) -> Any:
    tokenizer = load_tokenizer(bos_model_dir)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def test_bos_follows_the_flag_or_what_the_tokenizer_does(tokenizer, tokenizer_dir, bos_tokenizer):
    from transformers import AutoTokenizer

    flagged = AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    assert flagged.add_bos_token
    assert bos_token_id(flagged) == bos_token_id(bos_tokenizer) == tokenizer.bos_token_id == 1
    assert bos_token_id(tokenizer) is None
    sample = TextSample("one two three", RowRef("t.txt", 1))
    assert tokenize_text(flagged, sample, 8)[0].input_ids[0] == 1
    assert tokenize_text(tokenizer, sample, 8)[0].input_ids[0] != 1


def expected_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def check_windows(windows: list[Any], ids: list[int], seq_len: int, overlap: int, bos: int | None) -> None:
    """Windows cover `ids` in order, each overlap is shared and untrained, each token trained once."""
    prefix = [] if bos is None else [bos]
    starts = range(0, len(ids), seq_len - len(prefix) - overlap)
    assert len(windows) == len(starts) - (len(ids) - starts[-1] <= overlap)
    trained: list[int] = []
    for k, window in enumerate(windows):
        start = starts[k]
        assert window.input_ids == prefix + ids[start : start + seq_len - len(prefix)]
        context = len(prefix) + (overlap if k else 0)
        assert window.labels[:context] == [IGNORE_INDEX] * context
        assert window.labels[context:] == window.input_ids[context:]
        trained += window.labels[context:]
    assert trained == ids


@pytest.mark.parametrize("overlap", [0, 5])
def test_windows_follow_the_tokenizer_without_bos(tokenizer, overlap):
    assert not getattr(tokenizer, "add_bos_token", False)  # SmolLM2 adds no BOS
    windows = tokenize_text(tokenizer, TextSample(TEXT, RowRef("t.txt", 1)), 32, overlap)
    ids = expected_ids(tokenizer, TEXT)
    assert len(windows) > 3
    check_windows(windows, ids, 32, overlap, None)
    assert all(tokenizer.bos_token_id not in w.input_ids for w in windows)


@pytest.mark.parametrize("overlap", [0, 5])
def test_each_window_starts_with_bos_when_the_tokenizer_adds_it(bos_tokenizer, overlap):
    windows = tokenize_text(bos_tokenizer, TextSample(TEXT, RowRef("t.txt", 1)), 32, overlap)
    assert len(windows) > 3
    check_windows(windows, expected_ids(bos_tokenizer, TEXT), 32, overlap, bos_tokenizer.bos_token_id)
    assert all(w.input_ids.count(bos_tokenizer.bos_token_id) == 1 for w in windows)


def _txt(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_an_overlap_as_long_as_a_window_is_refused_naming_the_key(tmp_path, tokenizer, bos_tokenizer):
    cfg = DataConfig(train=[{"path": str(_txt(tmp_path))}], seq_len=16, pretrain_overlap=16, cache=False)
    with pytest.raises(DataError, match=r"^data\.pretrain_overlap \(16\) must be smaller than data\.seq_len"):
        build_data(cfg, tokenizer, "pretrain")
    with_bos = cfg.model_copy(update={"pretrain_overlap": 15})
    with pytest.raises(DataError, match=r"data\.pretrain_overlap \(15\) .* minus the BOS token"):
        build_data(with_bos, bos_tokenizer, "pretrain")
    assert build_data(with_bos, tokenizer, "pretrain").train  # 15 < 16 without BOS


@pytest.mark.slow  # a whole training run: 4-8 s on these machines
def test_pretrain_on_a_text_file_lowers_the_loss(tmp_path, bos_model_dir, bos_tokenizer):
    data = _txt(tmp_path)
    cfg = base_config(bos_model_dir, data, tmp_path / "run", method="pretrain")
    cfg["data"].update(seq_len=32, pretrain_overlap=4, cache=False, shuffle=False)
    cfg["train"].update(epochs=3, batch_size=2, lr=2e-2)
    config = load_config(cfg)
    built = build_data(config.data, bos_tokenizer, "pretrain")
    check_windows(built.train, expected_ids(bos_tokenizer, TEXT), 32, 4, bos_tokenizer.bos_token_id)

    result = train(config, show_progress=False)
    assert len(result.losses) == -(-len(built.train) // 2) * 3
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.3, result.losses
