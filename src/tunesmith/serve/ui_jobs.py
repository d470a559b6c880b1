"""The web UI's Train page: a run config (YAML) turned into a job of the same job service the OpenAI
fine-tuning API uses.

The page edits a run config, but a job's base, files and run directory are the server's to decide:
`model` must be the base this server serves, `data.train` / `data.eval` name uploaded file ids, and
`output` is not the user's. The OpenAI-shaped fields (epochs, batch size, seed, DPO beta) go into the
job request exactly as a client of `/v1/fine_tuning/jobs` would send them; every other key lies under
the job as its defaults (over the server's `--job-defaults`), so the run trains with what the page
showed.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from tunesmith.config.schema import DataConfig, LoraAdapter, RunConfig, TrainConfig
from tunesmith.jobs.service import JobService, ServiceError, merge_settings

METHODS = ("sft", "dpo")  # what the job service trains (results are served as adapters)
REQUEST_METHOD = {"sft": "supervised", "dpo": "dpo"}


class UIJobError(ValueError):
    """The YAML cannot become a job; `param` names the key (shown beside the editor)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_yaml(text: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UIJobError(f"the YAML does not parse: {exc}") from None
    if not isinstance(config, dict):
        raise UIJobError("the YAML must be a mapping of config sections (model, method, data, train, ...)")
    return config


def split_config(config: dict[str, Any], base_names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job request body, config defaults for this job) from a run config whose files are file ids."""
    config = copy.deepcopy(config)
    model = str(config.pop("model", "") or "")
    if model not in base_names:
        known = ", ".join(sorted(base_names))
        raise UIJobError(f"model {model!r}: this server fine-tunes the base it serves ({known})", "model")
    if "output" in config:
        raise UIJobError(
            "output: the server chooses each job's run directory; remove the output section", "output"
        )
    method = config.pop("method", "sft")
    if method not in METHODS:
        raise UIJobError(f"method {method!r}: jobs train with {' or '.join(METHODS)}", "method")
    data = config.get("data")
    if not isinstance(data, dict):
        raise UIJobError("data: a data section with train: [{path: FILE_ID}] is needed", "data")
    train_file = _file_id(data.pop("train", None), "data.train", required=True)
    eval_file = _file_id(data.pop("eval", None), "data.eval", required=False)
    train = config.get("train") or {}
    if not isinstance(train, dict):
        raise UIJobError("train: expected a mapping (epochs, batch_size, lr, ...)", "train")
    hyper: dict[str, Any] = {}
    for key, field in (("epochs", "n_epochs"), ("batch_size", "batch_size")):
        if key in train:
            value = train.pop(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UIJobError(
                    f"train.{key} must be a whole number of at least 1, got {value!r}", f"train.{key}"
                )
            hyper[field] = value
    if train.get("resume", "auto") != "auto":
        raise UIJobError(
            "train.resume: jobs always resume from their own checkpoints; remove it", "train.resume"
        )
    train.pop("resume", None)
    seed = train.pop("seed", None)
    if method == "dpo":
        dpo = config.get("dpo") or {}
        if isinstance(dpo, dict) and "beta" in dpo:
            hyper["beta"] = dpo.pop("beta")
    body: dict[str, Any] = {
        "model": model,
        "training_file": train_file,
        "method": {"type": REQUEST_METHOD[method], REQUEST_METHOD[method]: {"hyperparameters": hyper}},
    }
    if eval_file:
        body["validation_file"] = eval_file
    if seed is not None:
        body["seed"] = seed
    return body, {key: value for key, value in config.items() if value not in ({}, None)}


def _file_id(sources: Any, key: str, required: bool) -> str | None:
    if sources in (None, []):
        if required:
            raise UIJobError(f"{key}: upload a training file and name it as [{{path: FILE_ID}}]", key)
        return None
    if isinstance(sources, str):
        sources = [{"path": sources}]
    if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
        raise UIJobError(f"{key}: a job reads one uploaded file, as [{{path: FILE_ID}}]", key)
    extra = set(sources[0]) - {"path"}
    if extra:
        raise UIJobError(
            f"{key}[0]: only path is set for an uploaded file (remove {', '.join(sorted(extra))})", key
        )
    path = str(sources[0].get("path", ""))
    if not path.startswith("file-"):
        raise UIJobError(f"{key}[0].path must be an uploaded file id (file-...), got {path!r}", key)
    return path


def create_ui_job(service: JobService, text: str, suffix: str | None = None) -> dict[str, Any]:
    """Create the job the YAML describes through the service's own `create_job`: the keys the
    OpenAI request has no field for go in as that job's settings, so it is queued, run and served
    exactly like an API job."""
    config = parse_yaml(text)
    names = {service.base.name, service.base.path, *service.base.aliases}
    body, extra = split_config(config, names)
    if suffix:
        body["suffix"] = suffix
    return service.create_job(body, settings=extra)


def starting_yaml(service: JobService) -> str:
    """The Train page's first YAML: the server's job defaults filled in with small, safe values."""
    config: dict[str, Any] = {
        "model": service.base.name,
        "method": "sft",
        "data": {"train": [{"path": "file-..."}]},
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 2, "lr": 2e-4},
    }
    return yaml.safe_dump(merge_settings(config, _without_output(service.defaults)), sort_keys=False)


def _without_output(defaults: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in defaults.items() if key not in ("output", "model")}


# -- the form: fields of the config schema with their descriptions ------------------------------------

FORM_FIELDS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("data", DataConfig, "seq_len"),
    ("data", DataConfig, "packing"),
    ("data", DataConfig, "train_on_prompt"),
    ("data", DataConfig, "eval_split"),
    ("adapter", LoraAdapter, "r"),
    ("adapter", LoraAdapter, "alpha"),
    ("adapter", LoraAdapter, "dropout"),
    ("adapter", LoraAdapter, "targets"),
    ("train", TrainConfig, "epochs"),
    ("train", TrainConfig, "max_steps"),
    ("train", TrainConfig, "batch_size"),
    ("train", TrainConfig, "grad_accum"),
    ("train", TrainConfig, "lr"),
    ("train", TrainConfig, "warmup_ratio"),
    ("train", TrainConfig, "log_every"),
    ("train", TrainConfig, "eval_every"),
    ("train", TrainConfig, "save_every"),
    ("train", TrainConfig, "seed"),
)


def form_spec() -> dict[str, Any]:
    """The Train form, generated from the config schema: one entry per field with its JSON Schema
    (type, default, enum, bounds) and the schema's description as help."""
    fields = []
    sections = {
        name: model.model_json_schema()
        for name, model in (("data", DataConfig), ("adapter", LoraAdapter), ("train", TrainConfig))
    }
    for section, model, name in FORM_FIELDS:
        if name not in model.model_fields:
            continue
        schema = sections[section]["properties"].get(name, {})
        info = model.model_fields[name]
        default = info.get_default(call_default_factory=True)
        fields.append(
            {
                "key": f"{section}.{name}",
                "section": section,
                "name": name,
                "schema": schema,
                "default": default if _jsonable(default) else None,
                "help": info.description or schema.get("description") or "",
            }
        )
    method = RunConfig.model_fields["method"]
    return {
        "methods": list(METHODS),
        "method_help": method.description
        or "sft: supervised fine-tuning on conversations; dpo: preference pairs",
        "model_help": RunConfig.model_fields["model"].description or "",
        "fields": fields,
    }


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list))


__all__ = ["ServiceError", "UIJobError", "create_ui_job", "form_spec", "split_config", "starting_yaml"]
