"""Experiment trackers (TensorBoard, MLflow, W&B, SwanLab) behind one small interface.

`metrics.jsonl` stays the record of a run; each tracker receives the same rows, with the same names
and steps, so the curves a team watches in its tracker are the curves on disk. Every backend is an
optional extra: a backend that is not installed, or cannot write where it should, stops the run
before its first step with a message that names it (`TrackingError`), never halfway.

accelerate's tracker classes (`accelerate.tracking`) do the work where they fit: TensorBoard, W&B
and SwanLab start, log and finish through them. MLflow goes through `MlflowClient` directly, because
accelerate's `MLflowTracker` drives MLflow's process-wide fluent state (`mlflow.start_run`, the global
tracking URI), which fails when the calling process already has an active run, and it re-logs every
parameter on resume, which MLflow refuses where a value changed (`train.resume` itself changes).

A resumed run continues each tracker's run: the ids live in `RUN/tracking.json` (written
atomically). Rows of steps the tracker already holds from before a crash are not sent twice:
TensorBoard drops its own events from the resumed step on (`purge_step`) and receives them again;
MLflow, W&B and SwanLab cannot delete points, so they keep the first copy and skip the replayed one
(with exact resume both copies are the same numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.config.load import ConfigError
from tunesmith.training.durable import write_text_atomic
from tunesmith.training.metrics import plot_curves, read_metrics

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
SWANLAB_DIR = "swanlog"

log = logging.getLogger(__name__)

_MODULES = {
    "tensorboard": "torch.utils.tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "swanlab": "swanlab",
}
"""What each backend imports; the pip extra of the same name installs it."""


class TrackingError(ConfigError):
    """A tracker named in `tracking.backends` cannot be used (not installed, cannot write)."""


def check_installed(backends: Iterable[str]) -> None:
    """Import each backend's package now, so that a missing one stops the run before any work."""
    for name in backends:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise TrackingError(
                f"tracking.backends includes {name!r}, but its package cannot be imported ({exc}); "
                f"install it with: pip install 'tunesmith[{name}]', or remove {name!r} from tracking.backends"
            ) from None


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as the numbers a tracker takes: every value but `step`, None and text left out."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and value is not None
    }


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys (`train.lr`); lists become JSON text, scalars stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


class Tracker:
    """One backend's run. `ids` is what reopening the same run needs later (kept in tracking.json)."""

    name = ""
    skips_replayed_steps = True
    """False where the backend itself drops what follows the resumed step (TensorBoard's purge)."""

    def ids(self) -> dict[str, Any]:
        return {}

    def where(self) -> str:
        """One line for the terminal: where this tracker writes and how to look at it."""
        return self.name

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, ok: bool) -> None: ...


class TensorBoardTracker(Tracker):
    """RUN/tensorboard through accelerate's TensorBoardTracker; artifacts become text and images.

    The config is logged as text, not through accelerate's `store_init_configuration`: that calls
    `add_hparams`, which writes a second event directory (a phantom run in TensorBoard's list) and a
    `hparams.yml` under a new timestamped folder on every call.
    """

    name = "tensorboard"
    skips_replayed_steps = False

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from accelerate.tracking import TensorBoardTracker as Accelerate

        self.dir = run_dir / TENSORBOARD_DIR
        # purge_step: events a crashed attempt wrote from this step on are dropped by every reader.
        kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
        self.inner = Accelerate(TENSORBOARD_DIR, run_dir, **kwargs)
        self.inner.start()

    def where(self) -> str:
        return f"tensorboard: {self.dir} (view: tensorboard --logdir {self.dir})"

    def log_config(self, config: dict[str, Any]) -> None:
        import yaml

        self.inner.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)), 0)
        self.inner.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        writer = self.inner.writer
        if path.suffix == ".png":
            import matplotlib.image

            writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], 0, dataformats="HWC")
        else:
            writer.add_text(path.stem, _code_block(path.read_text(encoding="utf-8")), 0)
        writer.flush()

    def finish(self, ok: bool) -> None:
        self.inner.finish()


def _code_block(text: str) -> str:
    """TensorBoard renders text as markdown: indent it so that it shows verbatim."""
    return "\n".join("    " + line for line in text.splitlines())


@contextlib.contextmanager
def _logger_at(name: str, level: int) -> Iterator[None]:
    """A library's logger at `level` for a moment (its one-time notices), then as it was."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def default_mlflow_uri(run_dir: Path) -> str:
    """`sqlite:///RUN_PARENT/mlflow.db`: the runs of one folder share one store, to compare them."""
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


class MlflowTracker(Tracker):
    """An MLflow run through `MlflowClient`; the store is MLFLOW_TRACKING_URI, else SQLite beside the run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, run_name: str, previous: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        with _logger_at("mlflow", logging.WARNING):  # "Creating initial MLflow database tables..."
            self._start(run_dir, project, run_name, previous)

    def _start(self, run_dir: Path, project: str, run_name: str, previous: dict[str, Any]) -> None:
        run_id = previous.get("run_id") if previous.get("tracking_uri") == self.uri else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(project)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                # SQLite's default artifact root is ./mlruns under the working directory; keep the
                # artifacts beside the store instead.
                location = None
                if self.uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
                    location = (run_dir.resolve().parent / "mlflow-artifacts").as_uri()
                experiment_id = self.client.create_experiment(project, artifact_location=location)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id = run_id

    def ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def where(self) -> str:
        return f"mlflow: run {self.run_id} in {self.uri} (view: mlflow ui --backend-store-uri {self.uri})"

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        # A parameter cannot change once logged; on resume only the new keys are added (the
        # resolved config of each attempt is in the run's config.yaml).
        present = self.client.get_run(self.run_id).data.params
        params = [
            Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in flatten(config).items()
            if key not in present
        ]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def wandb_mode() -> str:
    """WANDB_MODE where set; `online` where the user has logged in (an API key); `offline` otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return "online" if read_netrc_auth(host=host) else "offline"
    except Exception:  # an unreadable .netrc or another wandb layout: do not go online by guess
        return "offline"


class WandbTracker(Tracker):
    """A W&B run through accelerate's WandBTracker; files under WANDB_DIR, else the run directory."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, previous: dict[str, Any]) -> None:
        import wandb
        from accelerate.tracking import WandBTracker as Accelerate

        self.mode = wandb_mode()
        self.dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        resume: dict[str, Any] = {"id": previous["id"], "resume": "allow"} if previous.get("id") else {}
        # console="off": W&B would otherwise wrap stdout and stderr, under the progress display.
        settings = wandb.Settings(console="off", silent=True)
        self.inner = Accelerate(
            project,
            name=run_name,
            mode=self.mode,
            dir=str(self.dir),
            settings=settings,
            **resume,
        )
        self.inner.start()
        self.run = self.inner.run

    def ids(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def where(self) -> str:
        if self.mode == "offline":
            return f"wandb: offline run {self.run.id} in {self.run.dir} (upload: wandb sync {Path(self.run.dir).parent})"
        return f"wandb: run {self.run.id} ({self.mode})"

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        # save() links the file into the run; the link must outlive the caller's scratch copy.
        kept = _keep_copy(path, Path(self.run.dir).parent / "artifacts")
        self.run.save(str(kept), base_path=str(kept.parent), policy="now")

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _keep_copy(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / path.name
    shutil.copyfile(path, kept)
    return kept


def swanlab_mode() -> str:
    """SWANLAB_MODE where set; `online` where the user has logged in (an API key); `offline` otherwise."""
    if os.environ.get("SWANLAB_MODE"):
        return os.environ["SWANLAB_MODE"]
    if os.environ.get("SWANLAB_API_KEY"):
        return "online"
    try:
        from swanlab.sdk.internal.settings import Settings

        return "online" if Settings().api_key else "offline"  # reads swanlab's own .netrc
    except Exception:
        return "offline"


class SwanlabTracker(Tracker):
    """A SwanLab run through accelerate's SwanLabTracker; logs under SWANLAB_LOG_DIR, else RUN/swanlog."""

    name = "swanlab"

    def __init__(self, run_dir: Path, project: str, run_name: str, previous: dict[str, Any]) -> None:
        import swanlab
        from accelerate.tracking import SwanLabTracker as Accelerate

        self.mode = swanlab_mode()
        self.dir = Path(os.environ.get("SWANLAB_LOG_DIR") or run_dir / SWANLAB_DIR)
        self.dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"id": previous["id"], "resume": "allow"} if previous.get("id") else {}
        # proxy_type none: SwanLab would otherwise copy the terminal into the run, under the progress display.
        with contextlib.suppress(Exception):  # a SwanLab without these settings (before 0.10): its defaults
            kwargs["settings"] = swanlab.Settings(terminal={"proxy_type": "none"})
        self.inner = Accelerate(project, name=run_name, mode=self.mode, log_dir=str(self.dir), **kwargs)
        with _quiet_stdout():
            self.inner.start()
        self.run = self.inner.run

    def ids(self) -> dict[str, Any]:
        return {"id": self.run.id}

    def where(self) -> str:
        if self.mode == "offline":
            return f"swanlab: offline run {self.run.id} in {self.dir} (upload: swanlab sync {self.dir}/run-*)"
        return f"swanlab: run {self.run.id} ({self.mode})"

    def log_config(self, config: dict[str, Any]) -> None:
        with _quiet_stdout():
            self.inner.store_init_configuration(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        kept = _keep_copy(path, Path(self.run.dir) / "artifacts")  # save() links, as W&B's does
        with _quiet_stdout():
            self.run.save(str(kept), base_path=str(kept.parent), policy="now")

    def finish(self, ok: bool) -> None:
        with _quiet_stdout():
            if ok:
                self.run.finish()
            else:
                self.run.finish(state="crashed", error="the training run stopped with an error")


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """SwanLab prints its notices to stdout, with no switch to stop it; they go to the debug log,
    and `where()` gives the one line a user needs (the folder and how to sync it)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("swanlab: %s", line)


class Trackers:
    """The run's trackers as one: a sink for metrics rows, then artifacts, then finish."""

    def __init__(self, trackers: list[Tracker], replayed_through: int | None = None) -> None:
        self.trackers = trackers
        self.replayed_through = replayed_through
        self.finished = False

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def where(self) -> list[str]:
        return [tracker.where() for tracker in self.trackers]

    def log_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row, at its own step."""
        step = int(row.get("step", 0))
        metrics = numeric_metrics(row)
        for tracker in self.trackers:
            replayed = self.replayed_through is not None and step <= self.replayed_through
            if metrics and not (replayed and tracker.skips_replayed_steps):
                tracker.log(metrics, step)

    def log_artifact(self, path: Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path)

    def log_artifacts(self, files: dict[str, str | Path | None]) -> None:
        """Files under their names: text is written first (to a scratch folder), paths are copied."""
        if not self.trackers:
            return
        with tempfile.TemporaryDirectory(prefix="tunesmith-artifacts-") as scratch:
            for name, content in files.items():
                if content is None:
                    continue
                target = Path(scratch) / name
                if isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_text(content, encoding="utf-8")
                self.log_artifact(target)

    def finish(self, ok: bool) -> None:
        if self.finished:
            return
        self.finished = True
        for tracker in self.trackers:
            tracker.finish(ok)


def open_trackers(
    cfg: Any, run_dir: Path, resume_step: int | None, main_process: bool, data_report: Any = None
) -> Trackers:
    """Start (or, resuming, reopen) each backend's run, then log the config and the data report.

    Only the main process logs; the others get an empty set. A backend that fails to start stops
    the run here, before training, and the ones already started are closed as failed.
    """
    backends = list(cfg.tracking.backends)
    if not backends or not main_process:
        return Trackers([])
    store = run_dir / TRACKING_FILE
    if resume_step is None:  # a fresh run: what an overwritten run left behind is not continued
        store.unlink(missing_ok=True)
        shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
    previous = _read_ids(store)
    run_name = cfg.tracking.run_name or run_dir.resolve().name
    opened: list[Tracker] = []
    for name in backends:
        try:
            opened.append(_open_one(name, run_dir, cfg.tracking.project, run_name, resume_step, previous))
        except Exception as exc:
            Trackers(opened).finish(ok=False)
            raise TrackingError(f"tracking: {name} could not start: {_reason(exc)}; {_fix(name)}") from exc
    write_text_atomic(store, json.dumps({t.name: t.ids() for t in opened}, indent=2) + "\n")
    trackers = Trackers(opened, _last_logged_step(run_dir) if resume_step is not None else None)
    try:
        for tracker in opened:
            tracker.log_config(cfg.model_dump(mode="json"))
        if data_report is not None:
            trackers.log_artifacts({"data_report.json": json.dumps(_report_dict(data_report), indent=2)})
    except Exception as exc:
        trackers.finish(ok=False)
        raise TrackingError(f"tracking: logging the config failed: {_reason(exc)}") from exc
    return trackers


def _open_one(
    name: str, run_dir: Path, project: str, run_name: str, resume_step: int | None, previous: dict[str, Any]
) -> Tracker:
    mine = previous.get(name, {}) if resume_step is not None else {}
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, resume_step)
    if name == "mlflow":
        return MlflowTracker(run_dir, project, run_name, mine)
    if name == "wandb":
        return WandbTracker(run_dir, project, run_name, mine)
    if name == "swanlab":
        return SwanlabTracker(run_dir, project, run_name, mine)
    raise TrackingError(f"tracking.backends: unknown backend {name!r}; choose from {', '.join(_MODULES)}")


def _fix(name: str) -> str:
    return {
        "tensorboard": "check that the run directory is writable",
        "mlflow": "set MLFLOW_TRACKING_URI to a store you can write (default: sqlite:///RUN_PARENT/mlflow.db)",
        "wandb": "check WANDB_DIR / WANDB_MODE (offline needs no account) or run `wandb login`",
        "swanlab": "check SWANLAB_LOG_DIR / SWANLAB_MODE (offline needs no account) or run `swanlab login`",
    }[name] + f", or remove {name!r} from tracking.backends"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_ids(store: Path) -> dict[str, Any]:
    try:
        found = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _last_logged_step(run_dir: Path) -> int | None:
    """The last step metrics.jsonl holds before a resume truncates it: the trackers hold it too."""
    path = run_dir / "metrics.jsonl"
    steps = [int(row.get("step", 0)) for row in read_metrics(path)] if path.is_file() else []
    return max(steps, default=None)


def _report_dict(report: Any) -> Any:
    return dataclasses.asdict(report) if dataclasses.is_dataclass(report) else {"summary": str(report)}


def run_summary(run_dir: Path, steps: int, total_steps: int, interrupted: bool) -> dict[str, Any]:
    """What a run reached, from its metrics.jsonl: logged at the end as `summary.json`."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    finite = [e for e in evals if math.isfinite(e)]
    last = train[-1] if train else {}
    return {
        "status": "interrupted" if interrupted else "finished",
        "steps": steps,
        "total_steps": total_steps,
        "final_loss": last.get("loss"),
        "last_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(finite) if finite else None,
        "tokens": last.get("tokens"),
        "trained_tokens": last.get("trained_tokens"),
        "tokens_per_s": last.get("tokens_per_s"),
        "elapsed_s": last.get("elapsed_s"),
        "run_dir": str(run_dir.resolve()),
    }


def finish_trackers(trackers: Trackers, run_dir: Path, summary: dict[str, Any]) -> None:
    """The end of a run: curves.png and summary.json as artifacts, then each tracker's run finished."""
    if not trackers:
        trackers.finish(ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="tunesmith-curves-") as scratch:
        curves = plot_curves(run_dir / "metrics.jsonl", Path(scratch) / "curves.png")
        trackers.log_artifacts({"curves.png": curves, "summary.json": json.dumps(summary, indent=2)})
    trackers.finish(ok=True)
