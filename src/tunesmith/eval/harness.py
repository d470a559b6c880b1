"""`tunesmith eval --harness TASKS`: lm-evaluation-harness itself, in process and offline.

For users who want the harness's whole task library. The model is handed to its HF backend as a
directory (`default` resolves to the cached safetensors of the embedded model); a finished LoRA run
is its base model plus `peft=` the run's adapter. Nothing is downloaded: the hub and datasets are
switched to offline mode, so tasks must point at local files or data already in the HF cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tunesmith.config.load import ConfigError
from tunesmith.eval.results import TaskResult

INSTALL_HINT = "lm-evaluation-harness is not installed; install it with: pip install 'tunesmith[eval]'"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def harness_model_args(model_spec: str) -> str:
    """lm-eval's `model_args` for a tunesmith model spec: `pretrained=DIR[,peft=ADAPTER],dtype=float32`."""
    from tunesmith.models.load import resolve_model_dir

    path = Path(model_spec).expanduser()
    adapter: Path | None = None
    from tunesmith.training.run_dir import RUN_INFO, read_run_info

    if path.is_dir() and (path / RUN_INFO).is_file():
        info = read_run_info(path)
        if info.get("method") == "reward":
            raise ConfigError(f"{path} is a reward model; the harness scores language models")
        if info["kind"] == "adapter":
            adapter, base = path / "adapter", Path(info["base_model"])
        else:
            base = path / info["kind"]
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        adapter, base = path, resolve_model_dir(config["base_model_name_or_path"])
    else:
        base = resolve_model_dir(model_spec)
    args = f"pretrained={base}"
    if adapter is not None:
        args += f",peft={adapter}"
    return args + ",dtype=float32"


def run_harness(
    model_spec: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    shots: int | None = None,
    log_samples: bool = False,
    include_path: str | None = None,
) -> list[TaskResult]:
    """Run lm-eval's `simple_evaluate` on the model; one TaskResult per task (and per group it reports)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(INSTALL_HINT)
    if not tasks:
        raise ConfigError("--harness needs at least one lm-eval task name (e.g. mmlu_anatomy)")
    os.environ.update(OFFLINE)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ConfigError(
            f"--harness: lm-eval knows no task {', '.join(map(repr, unknown))}{where}; "
            "`lm-eval ls tasks` lists them, and --include-path adds a folder of task YAMLs"
        )
    import torch

    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=harness_model_args(model_spec),
        tasks=tasks,
        num_fewshot=shots,
        limit=limit,
        log_samples=log_samples,
        task_manager=manager,
        batch_size=8,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    if output is None:  # ranks other than 0 under distributed evaluation
        return []
    return results_from_harness(output, log_samples)


def results_from_harness(output: dict[str, Any], log_samples: bool = False) -> list[TaskResult]:
    """lm-eval's output as TaskResults: `acc,none` becomes `acc`, other filters `acc,<filter>`."""
    counts = output.get("n-samples", {})
    samples = output.get("samples", {}) if log_samples else {}
    results = []
    for name, values in output["results"].items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = float(value)
        task_samples = samples.get(name)
        per_item: dict[str, list[float]] = {}
        for sample in task_samples or []:
            for metric in ("acc", "acc_norm", "exact_match"):
                if isinstance(sample.get(metric), (int, float)):
                    per_item.setdefault(metric, []).append(float(sample[metric]))
        n = counts.get(name, {}).get("effective") or len(task_samples or [])
        results.append(
            TaskResult(
                task=f"harness:{name}",
                n=int(n),
                metrics=metrics,
                per_item=per_item,
                samples=[_sample(s) for s in task_samples] if task_samples is not None else None,
            )
        )
    return results


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One logged sample, JSON-safe; for multiple choice also the per-choice `loglikelihoods`."""
    out: dict[str, Any] = {"doc_id": sample.get("doc_id"), "target": _plain(sample.get("target"))}
    resps = sample.get("resps") or []
    if resps and all(isinstance(r, list) and r and isinstance(r[0], (tuple, list)) for r in resps):
        out["loglikelihoods"] = [float(r[0][0]) for r in resps]
    elif resps:
        out["response"] = _plain(sample.get("filtered_resps"))
    for key in ("acc", "acc_norm", "exact_match"):
        if key in sample:
            out[key] = _plain(sample[key])
    return out


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
