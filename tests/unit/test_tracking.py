"""Trackers: each backend's own reader sees the same losses and steps as metrics.jsonl, resumes continue
the same tracker run without a duplicated step, and a tracker that cannot work stops the run before step 1.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import base_config, write_chat_jsonl
from tunesmith.config.load import load_config
from tunesmith.training.checkpoint import committed_checkpoints
from tunesmith.training.loop import train
from tunesmith.training.metrics import read_metrics
from tunesmith.training.tracking import TRACKING_FILE, TrackingError

ROWS = [(f"Question number {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]
TRACKED = ("loss", "lr", "grad_norm", "tokens", "eval_loss")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every tracker local, offline and inside tmp_path, whatever the machine's own settings."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("WANDB_API_KEY", "WANDB_DIR", "SWANLAB_API_KEY", "SWANLAB_LOG_DIR", "SWANLAB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("SWANLAB_ROOT", str(home / ".swanlab"))
    return tmp_path


def _config(model_dir: Path, data: Path, out: Path, backends: list[str], **train: Any) -> Any:
    settings = {"epochs": 2, "batch_size": 2, "lr": 5e-3, "seed": 1, "eval_every": 2, **train}
    raw = base_config(model_dir, data, out, train=settings, adapter={"type": "lora", "r": 4})
    raw["data"]["eval"] = [{"path": str(data)}]
    raw["tracking"] = {"backends": backends, "project": "tracking-test"}
    return load_config(raw)


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) series per tracked name: the reference every reader is held to."""
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in TRACKED}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for name in TRACKED:
            if isinstance(row.get(name), (int, float)):
                series[name].append((row["step"], float(row[name])))
    return series


# -- each backend's own reader ------------------------------------------------------------------------


def _read_tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]}


def _read_mlflow(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    keys = client.get_run(ids["run_id"]).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], key)) for key in keys
    }


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline `.wandb` file: a ':W&B' header, then a LevelDB-style log of
    32 KiB blocks whose records (crc32, length, type) may be split across blocks."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            parts = data
        elif kind == 3:
            parts += data
        elif kind == 4:
            out.append(parts + data)
    return out


def _wandb_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _read_wandb(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from wandb.proto import wandb_internal_pb2

    series: dict[str, list[tuple[int, float]]] = {}
    for path in _wandb_files(run_dir):
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for key, value in items.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((items["_step"], float(value)))
    return {key: sorted(points) for key, points in series.items()}


def _swanlab_records(run_dir: Path) -> list[Any]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    records = []
    for path in sorted((run_dir / "swanlog").glob("run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(str(path))
        while (data := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(data)
            records.append(record)
    return records


def _read_swanlab(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in _swanlab_records(run_dir):
        if record.WhichOneof("record_type") == "scalar":
            series.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    return {key: sorted(points) for key, points in series.items()}


READERS = {
    "tensorboard": _read_tensorboard,
    "mlflow": _read_mlflow,
    "wandb": _read_wandb,
    "swanlab": _read_swanlab,
}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "swanlab": "swanlab"}


def _assert_same_as_metrics(backend: str, run_dir: Path) -> None:
    expected, logged = _expected(run_dir), READERS[backend](run_dir)
    for name, points in expected.items():
        assert points, name  # the run logged this metric at all
        got = logged.get(name)
        assert got is not None, f"{backend} has no {name!r}"
        assert [s for s, _ in got] == [s for s, _ in points], f"{backend} {name}: steps differ"
        if backend == "tensorboard":
            # TensorBoard stores scalars as float32 (simple_value): the one conversion allowed.
            import numpy as np

            want = [float(np.float32(v)) for _, v in points]
        else:
            want = [v for _, v in points]
        assert [v for _, v in got] == want, f"{backend} {name}: values differ"


def _tracker_run_ids(backend: str, run_dir: Path) -> set[str]:
    """The ids of the tracker runs the run dir's files hold (one id: one tracker run)."""
    if backend == "wandb":
        return {path.stem.removeprefix("run-") for path in _wandb_files(run_dir)}
    if backend == "swanlab":
        return {r.start.id for r in _swanlab_records(run_dir) if r.WhichOneof("record_type") == "start"}
    if backend == "mlflow":
        from mlflow.tracking import MlflowClient

        ids = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
        client = MlflowClient(tracking_uri=ids["tracking_uri"])
        experiment = client.get_experiment_by_name("tracking-test")
        return {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    return {"tensorboard"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(READERS))
def test_tracker_reads_back_metrics_and_resume_continues_the_same_run(
    backend, offline, tiny_model_dirs, tmp_path
):
    """A crash after step 3 (its checkpoint lost) and a resume from step 2: the tracker holds each step
    once, the same numbers as metrics.jsonl, in one tracker run."""
    pytest.importorskip(PACKAGES[backend])
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    run_dir = tmp_path / "run"
    cfg = _config(tiny_model_dirs["llama"], data, run_dir, [backend], save_every=1)
    first = train(cfg, show_progress=False, stop_after_step=3)
    assert first.interrupted and first.steps == 3
    ids_before = json.loads((run_dir / TRACKING_FILE).read_text())[backend]
    # Lose the newest checkpoint: the resume replays step 3, which the tracker already holds.
    shutil.rmtree(committed_checkpoints(run_dir / "checkpoints")[-1])
    second = train(
        _config(tiny_model_dirs["llama"], data, run_dir, [backend], save_every=1, resume="auto"),
        show_progress=False,
    )
    assert not second.interrupted and second.steps == 10  # 2 epochs x 5 batches
    assert json.loads((run_dir / TRACKING_FILE).read_text())[backend] == ids_before
    assert len(_tracker_run_ids(backend, run_dir)) == 1
    _assert_same_as_metrics(backend, run_dir)
    assert [s for s, _ in _expected(run_dir)["loss"]] == list(range(1, 11))


@pytest.mark.slow
def test_all_backends_at_once_get_config_artifacts_and_every_row(offline, tiny_model_dirs, tmp_path):
    for name in PACKAGES.values():
        pytest.importorskip(name)
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    run_dir = tmp_path / "run"
    cfg = _config(tiny_model_dirs["llama"], data, run_dir, list(READERS), epochs=1)
    train(cfg, show_progress=False)
    for backend in READERS:
        _assert_same_as_metrics(backend, run_dir)

    from mlflow.tracking import MlflowClient

    ids = json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    assert ids["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # the default store
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["method"] == cfg.method
    artifacts = {a.path for a in client.list_artifacts(ids["run_id"])}
    assert {"curves.png", "summary.json", "data_report.json"} <= artifacts
    summary = json.loads(
        Path(client.download_artifacts(ids["run_id"], "summary.json", str(tmp_path))).read_text()
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert summary["steps"] == 5 and summary["status"] == "finished"
    assert summary["final_loss"] == [r["loss"] for r in rows if "loss" in r][-1]
    report = json.loads(
        Path(client.download_artifacts(ids["run_id"], "data_report.json", str(tmp_path))).read_text()
    )
    assert report["train_samples"] == len(ROWS)

    wandb_dir = _wandb_files(run_dir)[0].parent
    assert json.loads((wandb_dir / "files" / "summary.json").read_text())["steps"] == 5
    swan_files = next((run_dir / "swanlog").glob("run-*")) / "files"
    assert json.loads((swan_files / "summary.json").read_text())["steps"] == 5

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "curves" in events.Tags()["images"]
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])


@pytest.mark.parametrize("backend", list(READERS))
def test_a_missing_tracker_package_stops_before_training(
    backend, offline, tiny_model_dirs, tmp_path, monkeypatch
):
    module = {"tensorboard": "torch.utils.tensorboard"}.get(backend, backend)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    run_dir = tmp_path / "run"
    with pytest.raises(TrackingError, match=rf"{backend}.*pip install 'tunesmith\[{backend}\]'"):
        train(_config(tiny_model_dirs["llama"], data, run_dir, [backend]), show_progress=False)
    assert not committed_checkpoints(run_dir / "checkpoints")
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir / "metrics.jsonl")


def test_an_unwritable_tracker_store_stops_before_training(offline, tiny_model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    data = write_chat_jsonl(tmp_path / "d.jsonl", ROWS)
    run_dir = tmp_path / "run"
    with pytest.raises(TrackingError, match="mlflow could not start.*MLFLOW_TRACKING_URI"):
        train(
            _config(tiny_model_dirs["llama"], data, run_dir, ["tensorboard", "mlflow"]), show_progress=False
        )
    assert not committed_checkpoints(run_dir / "checkpoints")
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir / "metrics.jsonl")


def test_rows_go_to_the_file_first_then_every_sink_unchanged(tmp_path):
    from tunesmith.training.metrics import MetricsLog

    seen: list[dict[str, Any]] = []
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.1 + 0.2, "epoch": None}, {"step": 1, "eval_loss": 1 / 3}]
    log = MetricsLog(path, None, sinks=[lambda row: seen.append(dict(row)) or path.read_text()])
    for row in rows:
        log.write(row)
    assert seen == rows
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)  # byte for byte as before


def test_only_numbers_reach_a_tracker_and_replayed_steps_are_not_sent_twice():
    from tunesmith.training.tracking import Tracker, Trackers, numeric_metrics

    assert numeric_metrics({"step": 4, "loss": 1.5, "epoch": None, "skipped": True, "tokens": 7}) == {
        "loss": 1.5,
        "skipped": 1.0,
        "tokens": 7.0,
    }

    class Recorder(Tracker):
        def __init__(self, skips: bool) -> None:
            self.skips_replayed_steps, self.points = skips, []

        def log(self, metrics, step):
            self.points.append((step, metrics["loss"]))

    keeps_first, purges = Recorder(True), Recorder(False)
    trackers = Trackers([keeps_first, purges], replayed_through=3)
    for step in (3, 4):
        trackers.log_row({"step": step, "loss": float(step)})
    assert keeps_first.points == [(4, 4.0)]
    assert purges.points == [(3, 3.0), (4, 4.0)]
