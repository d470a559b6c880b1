"""The run directory and its checkpoints survive what users and machines do to them: a second run
in the same directory, a stop on a save step, a power loss mid-commit, a corrupt newest checkpoint,
a crash during the final save, and a directory that cannot be written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from conftest import base_config, write_chat_jsonl
from tunesmith.cli.main import main
from tunesmith.config.load import load_config
from tunesmith.training import checkpoint as checkpoint_module
from tunesmith.training import durable
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.errors import RunDirError
from tunesmith.training.loop import train
from tunesmith.training.run_dir import LOCK_FILE, RunLock, read_run_info

ROWS = [(f"Question {i}: spell {i}.", f"{i} is spelled {i}.") for i in range(10)]


def _cfg(model_dir, data, out, **train_settings):
    settings = {"epochs": 2, "batch_size": 2, **train_settings}
    return load_config(base_config(model_dir, data, out, adapter={"type": "lora", "r": 4}, train=settings))


@pytest.fixture
def data(tmp_path):
    return write_chat_jsonl(tmp_path / "d.jsonl", ROWS)


def test_second_run_into_a_locked_directory_is_refused(tiny_model_dirs, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    busy = f"in use by another tunesmith run \\(pid {os.getpid()}"
    with RunLock(out), pytest.raises(RunDirError, match=busy):  # another run holds the directory
        train(_cfg(tiny_model_dirs["llama"], data, out), show_progress=False)
    assert not (out / "metrics.jsonl").exists()  # the refused run touched nothing


def test_stale_lock_of_a_dead_run_does_not_block(tiny_model_dirs, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone"}))  # left by kill -9
    result = train(_cfg(tiny_model_dirs["llama"], data, out, max_steps=2), show_progress=False)
    assert result.steps == 2


def test_stop_on_a_save_step_writes_that_checkpoint_once(tiny_model_dirs, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    commits: list[str] = []
    original = checkpoint_module.commit_dir

    def record(staging, final):
        commits.append(final.name)
        original(staging, final)

    monkeypatch.setattr(checkpoint_module, "commit_dir", record)
    cfg = _cfg(tiny_model_dirs["llama"], data, out, save_every=2, save_total_limit=1)
    result = train(cfg, show_progress=False, stop_after_step=4)
    assert result.interrupted
    assert commits == ["step-00000002", "step-00000004"]  # before, step 4 was removed and written again
    assert [p.name for p in committed_checkpoints(out / "checkpoints")] == ["step-00000004"]


def test_the_checkpoint_history_keeps_pruned_checkpoints(tiny_model_dirs, data, tmp_path):
    from tunesmith.training.checkpoint import checkpoint_history

    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dirs["llama"], data, out, save_every=2, save_total_limit=1)
    train(cfg, show_progress=False, stop_after_step=6)
    folder = out / "checkpoints"
    assert [p.name for p in committed_checkpoints(folder)] == ["step-00000006"]
    assert [p.name for p in checkpoint_history(folder)] == ["step-00000002", "step-00000004", "step-00000006"]


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model_dirs, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = checkpoint_module.save_file

    def fail_on_step_4(tensors, path, *args, **kwargs):
        if ".step-00000004.partial" in str(path) and path.name == "trainable.safetensors":
            raise OSError(errno.EIO, "Input/output error")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", fail_on_step_4)
    cfg = _cfg(tiny_model_dirs["llama"], data, out, save_every=2, save_total_limit=1)
    with pytest.raises(RunDirError, match="could not write checkpoint .*step-00000004"):
        train(cfg, show_progress=False)
    assert [p.name for p in committed_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".*partial"))


def test_checkpoint_files_are_fsynced_before_the_commit_rename(tiny_model_dirs, data, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    out = tmp_path / "run"
    train(_cfg(tiny_model_dirs["llama"], data, out, max_steps=1), show_progress=False)
    commit = next(
        i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith("step-00000001")
    )
    synced = {Path(what).name for kind, what in events[:commit] if kind == "fsync"}
    for name in (
        "trainable.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "state.json",
        ".step-00000001.partial",
    ):
        assert name in synced, name
    after = {Path(what).name for kind, what in events[commit:] if kind == "fsync"}
    assert "checkpoints" in after  # the rename itself is made durable


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_model_dirs, data, tmp_path, capsys):
    model_dir = tiny_model_dirs["llama"]
    straight = train(_cfg(model_dir, data, tmp_path / "a"), show_progress=False)
    out = tmp_path / "b"
    train(
        _cfg(model_dir, data, out, save_every=2, save_total_limit=3), show_progress=False, stop_after_step=6
    )
    newest = out / "checkpoints" / "step-00000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash or a bad disk
    resumed = train(
        _cfg(model_dir, data, out, save_every=2, save_total_limit=3, resume="auto"), show_progress=True
    )
    said = capsys.readouterr().out
    assert "step-00000006" in said and "cannot be loaded" in said and "resumed from" in said
    assert "step-00000004" in said.split("resumed from")[1]
    assert resumed.losses == straight.losses[4:]  # exact, from step 4
    assert (out / "checkpoints" / "step-00000006.unreadable").is_dir()  # kept for inspection, not resumed


def test_crash_during_the_final_save_leaves_an_unfinished_run(tiny_model_dirs, data, tmp_path, monkeypatch):
    from tunesmith.training import run_dir as run_dir_module

    out = tmp_path / "run"
    model_dir = tiny_model_dirs["llama"]
    train(_cfg(model_dir, data, out, max_steps=2), show_progress=False)
    assert read_run_info(out)["kind"] == "adapter"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. a kill during save_pretrained

    monkeypatch.setattr(run_dir_module, "save_model_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, data, out, max_steps=4, resume="auto"), show_progress=False)
    # The old run.json no longer vouches for an adapter of 2 steps: the run reads as unfinished.
    with pytest.raises(RunDirError, match="this run has not finished"):
        read_run_info(out)


def _cli_train(tiny_model_dirs, data, tmp_path, out, capsys, *extra):
    config = tmp_path / "cfg.yaml"
    import yaml

    config.write_text(yaml.safe_dump(base_config(tiny_model_dirs["llama"], data, out)))
    code = main(["train", str(config), *extra])
    return code, capsys.readouterr().err


def test_output_dir_that_is_a_file(tiny_model_dirs, data, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    code, err = _cli_train(tiny_model_dirs, data, tmp_path, blocker / "run", capsys)
    assert code == 2 and "Traceback" not in err
    assert f"error: output.dir {blocker / 'run'} cannot be created: {blocker} is a file" in err


def test_output_dir_on_a_read_only_file_system(tiny_model_dirs, data, tmp_path, capsys, monkeypatch):
    original = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "readonly" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = _cli_train(tiny_model_dirs, data, tmp_path, tmp_path / "readonly" / "run", capsys)
    assert code == 2 and "Traceback" not in err
    assert "is not writable: the file system is read-only" in err


def test_disk_full_during_a_checkpoint(tiny_model_dirs, data, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    def full_disk_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # torch wrote part of the file, then the disk filled up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 500, 500))
    out = tmp_path / "run"
    code, err = _cli_train(tiny_model_dirs, data, tmp_path, out, capsys)
    assert code == 2 and "Traceback" not in err
    assert "error: no space left to write checkpoint" in err and "needs about" in err and "500 B free" in err
    assert not list((out / "checkpoints").glob(".*"))  # the partial checkpoint no longer holds the space
