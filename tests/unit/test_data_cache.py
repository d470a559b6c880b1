"""Preprocessing cache (keyed by everything that changes tokens) and parallel tokenization."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tunesmith.config.schema import DataConfig
from tunesmith.data import batch_tokenize, cache
from tunesmith.data.batch_tokenize import TokenizeSettings, tokenize_all
from tunesmith.data.block import TokenBlock, concat
from tunesmith.data.build import build_data
from tunesmith.data.errors import DataError
from tunesmith.data.validate import read_samples


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CACHE_MIN_BYTES", 0)
    return tmp_path / "cache" / "data"


def _write_rows(path: Path, rows: int, start: int = 0) -> Path:
    with path.open("a", encoding="utf-8") as handle:
        for i in range(start, start + rows):
            turns = [
                {"role": "user", "content": f"Question number {i}: what is {i} squared?"},
                {"role": "assistant", "content": f"<think>{i} times {i}</think>It is {i * i}."},
            ]
            if i % 3 == 0:
                turns += [
                    {"role": "user", "content": "Thanks."},
                    {"role": "assistant", "content": "Welcome."},
                ]
            handle.write(json.dumps({"messages": turns}) + "\n")
    return path


def _build(tokenizer, path: Path, **options):
    cfg = DataConfig(train=[{"path": str(path)}], **{"seq_len": 256, **options})
    return build_data(cfg, tokenizer, "sft")


def _same(a, b) -> bool:
    return [(s.input_ids, s.labels, str(s.source), s.truncated) for s in a] == [
        (s.input_ids, s.labels, str(s.source), s.truncated) for s in b
    ]


def test_second_build_loads_from_cache_with_identical_samples(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 30)
    first = _build(tokenizer, data)
    second = _build(tokenizer, data)
    assert not first.report.sources[0].from_cache and second.report.sources[0].from_cache
    assert _same(first.train, second.train)
    assert first.report.summary() == second.report.summary()
    [entry] = list(cache_home.glob("*.safetensors"))
    with safe_open(str(entry), framework="np") as handle:  # plain arrays + JSON, no pickle
        assert set(handle.keys()) == {"ids", "trained", "offsets", "truncated", "file_index", "lines"}


@pytest.mark.parametrize(
    "change",
    [
        {"mask_history": True},
        {"reasoning": "strip"},
        {"seq_len": 48},
        {"template": "chatml"},
        {"train_on_prompt": True},
    ],
)
def test_every_option_that_changes_tokens_changes_the_key(tokenizer, tmp_path, cache_home, change):
    data = _write_rows(tmp_path / "d.jsonl", 10)
    _build(tokenizer, data)
    options = {"seq_len": 256, **change}
    changed = build_data(DataConfig(train=[{"path": str(data)}], **options), tokenizer, "sft")
    assert not changed.report.sources[0].from_cache
    assert len(list(cache_home.glob("*.safetensors"))) == 2


def test_options_that_do_not_change_tokens_reuse_the_entry(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 10)
    _build(tokenizer, data)
    again = _build(tokenizer, data, seed=5, dedup=True, packing=False, num_proc=1)
    assert again.report.sources[0].from_cache


def test_editing_the_file_invalidates_the_entry(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 10)
    _build(tokenizer, data)
    _write_rows(data, 1, start=10)
    later = time.time() + 5
    os.utime(data, (later, later))
    rebuilt = _build(tokenizer, data)
    assert not rebuilt.report.sources[0].from_cache and rebuilt.report.train_samples == 11


def test_a_different_tokenizer_gets_a_different_key(tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    )
    assert cache.tokenizer_fingerprint(tokenizer) != cache.tokenizer_fingerprint(other)
    assert cache.tokenizer_fingerprint(tokenizer) == cache.tokenizer_fingerprint(tokenizer)


def test_skipped_and_dropped_rows_are_cached_too(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 10)
    with data.open("a") as handle:
        handle.write("{broken\n")
    options = {"on_error": "skip", "seq_len": 48, "max_dropped_fraction": 1.0}
    first = _build(tokenizer, data, **options)
    second = _build(tokenizer, data, **options)
    assert second.report.sources[0].from_cache
    assert [str(i) for i in second.report.skipped] == [str(i) for i in first.report.skipped]
    assert [str(i) for i in second.report.dropped] == [str(i) for i in first.report.dropped]
    assert len(first.report.skipped) == 1 and len(first.report.dropped) == 10 - first.report.train_samples
    assert second.report.truncated == first.report.truncated > 0


def test_an_unreadable_entry_is_rebuilt(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 5)
    _build(tokenizer, data)
    [entry] = list(cache_home.glob("*.safetensors"))
    entry.write_bytes(b"not a safetensors file")
    rebuilt = _build(tokenizer, data)
    assert not rebuilt.report.sources[0].from_cache and rebuilt.report.train_samples == 5


def test_small_sources_are_not_cached_by_default(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = _write_rows(tmp_path / "d.jsonl", 5)
    _build(tokenizer, data)
    assert not (tmp_path / "cache" / "data").exists()


def test_cache_can_be_turned_off(tokenizer, tmp_path, cache_home):
    data = _write_rows(tmp_path / "d.jsonl", 5)
    _build(tokenizer, data, cache=False)
    assert not cache_home.exists()


def test_warm_build_reads_nothing_but_the_cache(tokenizer, tmp_path, cache_home):
    """The warm build must not read or tokenize the file: it is made unreadable, key unchanged."""
    data = _write_rows(tmp_path / "d.jsonl", 60)
    cold = _build(tokenizer, data, num_proc=1)
    [entry] = list(cache_home.glob("*.safetensors"))
    written = entry.stat().st_ino, entry.read_bytes()
    _scramble_keeping_size_and_mtime(data)
    with pytest.raises(DataError):  # the file itself no longer gives samples
        _build(tokenizer, data, cache=False)
    warm = _build(tokenizer, data)
    assert not cold.report.sources[0].from_cache and warm.report.sources[0].from_cache
    assert warm.report.train_samples == cold.report.train_samples == 60
    assert _same(cold.train, warm.train) and _same(cold.eval, warm.eval)
    assert warm.report.summary() == cold.report.summary()
    assert (entry.stat().st_ino, entry.read_bytes()) == written  # read, not rewritten (a write renames)


def _scramble_keeping_size_and_mtime(path: Path) -> None:
    """Replace every byte but the newlines, so the cache key (path, size, mtime) stays the same."""
    stat = path.stat()
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(b"{" * len(line) for line in lines))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_parallel_tokenization_equals_serial(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_tokenize, "PARALLEL_MIN_SAMPLES", 0)
    data = _write_rows(tmp_path / "d.jsonl", 60)
    samples = read_samples(str(data)).samples
    settings = TokenizeSettings(seq_len=24, mask_history=True, reasoning="strip")  # some truncated/dropped
    serial = tokenize_all(samples, tokenizer, tokenizer.chat_template, settings, num_proc=1)
    parallel = tokenize_all(samples, tokenizer, tokenizer.chat_template, settings, num_proc=2)
    assert _same(serial.block.to_samples(), parallel.block.to_samples())
    assert serial.truncated == parallel.truncated > 0
    assert [str(i) for i in serial.dropped] == [str(i) for i in parallel.dropped] != []


@pytest.mark.parametrize("num_proc", [1, 2])
def test_counted_tokenization_equals_plain_and_counts_every_row(num_proc, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_tokenize, "PARALLEL_MIN_SAMPLES", 0)
    samples = read_samples(str(_write_rows(tmp_path / "d.jsonl", 60))).samples
    settings = TokenizeSettings(seq_len=24, mask_history=True)
    plain = tokenize_all(samples, tokenizer, tokenizer.chat_template, settings, num_proc=num_proc)
    counts: list[int] = []
    counted = tokenize_all(samples, tokenizer, tokenizer.chat_template, settings, num_proc, counts.append)
    assert _same(plain.block.to_samples(), counted.block.to_samples())
    assert [str(i) for i in plain.dropped] == [str(i) for i in counted.dropped]
    assert sum(counts) == 60 and len(counts) > 1


def test_token_block_round_trip(tokenizer, tmp_path):
    data = _write_rows(tmp_path / "d.jsonl", 7)
    samples = read_samples(str(data)).samples
    result = tokenize_all(samples, tokenizer, tokenizer.chat_template, TokenizeSettings(seq_len=256))
    back = result.block.to_samples()
    assert _same(TokenBlock.from_samples(back).to_samples(), back)
    halves = concat([TokenBlock.from_samples(back[:3]), TokenBlock.from_samples(back[3:])])
    assert _same(halves.to_samples(), back)
    assert len(concat([])) == 0


def _fake_entry(folder: Path, name: str, size: int, age_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_cache_evicts_least_recently_used_entries_beyond_its_cap(
    tokenizer, tmp_path, cache_home, monkeypatch
):
    old = _fake_entry(cache_home, "old", 4000, age_s=300)
    recent = _fake_entry(cache_home, "recent", 4000, age_s=100)
    _build(tokenizer, _write_rows(tmp_path / "a.jsonl", 20))
    assert old.exists() and recent.exists()  # under the default cap nothing goes
    written = [p for p in cache.entries() if p not in (old, recent)]
    assert len(written) == 1
    monkeypatch.setenv(cache.MAX_BYTES_ENV, str(written[0].stat().st_size + 4000 + 10))
    os.utime(old, None)  # reading would do this: `old` becomes the most recently used
    _build(tokenizer, _write_rows(tmp_path / "b.jsonl", 20))
    left = {p.name for p in cache.entries()}
    assert (
        "recent.safetensors" not in left and "old.safetensors" in left
    )  # the least recently used went first
    assert len(left) == 2  # the new entry and `old` fit under the cap


def test_reading_an_entry_marks_it_used(tokenizer, tmp_path, cache_home):
    path = _write_rows(tmp_path / "a.jsonl", 20)
    _build(tokenizer, path)
    (entry,) = cache.entries()
    os.utime(entry, (1_000_000, 1_000_000))
    _build(tokenizer, path)
    assert entry.stat().st_mtime > 1_000_000


def test_the_cap_names_a_bad_setting(monkeypatch):
    from tunesmith.config.load import ConfigError

    monkeypatch.setenv(cache.MAX_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match="TUNESMITH_DATA_CACHE_MAX: not a size: 'lots'"):
        cache.max_bytes()
    monkeypatch.setenv(cache.MAX_BYTES_ENV, "1.5GB")
    assert cache.max_bytes() == int(1.5 * 1024**3)


def test_cache_command_lists_and_clears_areas(tmp_path, monkeypatch, capsys):
    from tunesmith.cli.main import main

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    _fake_entry(tmp_path / "cache" / "data", "a", 3000, age_s=10)
    model = tmp_path / "cache" / "models" / "m-123"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"y" * 5000)
    busy = tmp_path / "cache" / "models" / ".converting-abc"
    busy.mkdir()
    assert main(["cache", "--json"]) == 0
    listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)["areas"]}
    assert (listed["data"]["entries"], listed["data"]["bytes"]) == (1, 3000)
    assert (listed["models"]["entries"], listed["models"]["bytes"]) == (2, 5000)
    assert main(["cache", "clear", "models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"cleared": ["models"], "freed_bytes": 5000}
    assert not model.exists() and busy.exists()  # a conversion that may be running is left alone
    assert (tmp_path / "cache" / "data" / "a.safetensors").exists()
    assert main(["cache", "clear", "weights"]) == 2
    assert "unknown cache area 'weights'" in capsys.readouterr().err
