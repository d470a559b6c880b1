"""What the server serves: one base model in memory and any number of LoRA adapters over it, by name.

`tunesmith serve MODEL_OR_RUN_DIR --adapter NAME=RUN_DIR ...`: the positional argument gives the
base (a model spec, a full fine-tuning run, or a LoRA run / PEFT directory whose base it names, the
adapter then served too under the directory's name). Every adapter is loaded into one PeftModel
under an internal name (`a0`, `a1`, ...: PEFT module names cannot hold the dots and slashes users
put in served names) and must have been trained on that base.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.infer.loading import enclosing_run, recorded_trust, with_run_template
from tunesmith.models.default_model import DEFAULT_MODEL_NAME
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_dir
from tunesmith.serve.stops import reply_stop_ids

log = logging.getLogger(__name__)


class ServeSetupError(ValueError):
    """A served model or adapter that cannot be loaded as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ServedModel:
    """One name a request's `model` field can choose."""

    name: str
    adapter: str | None  # the PEFT adapter name inside the shared model; None serves the bare base
    tokenizer: Any
    stop_token_ids: frozenset[int]
    source: str
    created: int


@dataclass
class ModelSet:
    model: Any  # the base, or a PeftModel over it holding every adapter
    served: dict[str, ServedModel]
    base_name: str
    context_length: int


@dataclass(frozen=True)
class _Adapter:
    name: str
    directory: Path
    base_dir: Path


def load_model_set(
    spec: str,
    adapters: list[tuple[str, str]] | None = None,
    dtype: torch.dtype = torch.float32,
    base_name: str | None = None,
    max_context: int | None = None,
) -> ModelSet:
    """Load the base named by `spec` and every (name, run or adapter dir) in `adapters` over it."""
    base_dir, own_adapter = _base_of(spec)
    wanted = ([own_adapter] if own_adapter else []) + [
        _adapter_of(name, Path(path).expanduser()) for name, path in adapters or []
    ]
    name = base_name or _base_display_name(spec, base_dir)
    names = [name, *(a.name for a in wanted)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServeSetupError(f"served model names must differ; used twice: {', '.join(duplicates)}")
    for adapter in wanted:
        _check_same_base(adapter, base_dir)

    runs = {a.directory: enclosing_run(a.directory) for a in wanted}
    base_run = enclosing_run(base_dir)
    trust = any(recorded_trust(run) for run in [base_run, *runs.values()])
    model = load_model(base_dir, dtype, trust).eval()
    base_tokenizer = _run_tokenizer(base_dir, base_run, trust)
    now = int(time.time())
    served = {
        name: ServedModel(
            name, None, base_tokenizer, reply_stop_ids(model, base_tokenizer), str(base_dir), now
        )
    }
    if wanted:
        model = _load_adapters(model, wanted)
    for index, adapter in enumerate(wanted):
        tokenizer = _run_tokenizer(adapter.directory, runs[adapter.directory], trust, base_tokenizer)
        served[adapter.name] = ServedModel(
            adapter.name,
            f"a{index}",
            tokenizer,
            reply_stop_ids(model, tokenizer),
            str(adapter.directory),
            now,
        )
    context = _context_length(model)
    if max_context is not None:
        context = min(context, max_context)
    return ModelSet(model=model, served=served, base_name=name, context_length=context)


def _run_tokenizer(
    directory: Path, run: tuple[Path, dict[str, Any]] | None, trust: bool, fallback: Any = None
) -> Any:
    """The directory's own tokenizer (else a copy of `fallback`) with the template its run trained with."""
    if fallback is None or (directory / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(directory, trust)
    else:
        tokenizer = copy.deepcopy(fallback)  # the run's template must not change the base's tokenizer
    return with_run_template(tokenizer, *run) if run else tokenizer


def _base_of(spec: str) -> tuple[Path, _Adapter | None]:
    """The base model directory of `spec`, and the adapter `spec` itself holds, if any."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "run.json").is_file():
        from tunesmith.training.run_dir import read_run_info

        info = read_run_info(path)
        if info["kind"] == "model":
            return path / "model", None
        adapter = _adapter_of(path.name, path)
        return adapter.base_dir, adapter
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter = _adapter_of(path.name, path)
        return adapter.base_dir, adapter
    if path.is_dir() and not (path / "config.json").is_file():
        from tunesmith.training.run_dir import holds_run, read_run_info

        if holds_run(path) or (path / "config.yaml").is_file():
            read_run_info(path)  # names an unfinished run and says how to finish it
    return resolve_model_dir(spec), None


def _adapter_of(name: str, path: Path) -> _Adapter:
    """A LoRA run directory or a PEFT adapter directory, with the base it was trained on."""
    if not name:
        raise ServeSetupError("--adapter needs NAME=RUN_DIR with a non-empty NAME")
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        return _Adapter(name, path, resolve_model_dir(config["base_model_name_or_path"]))
    from tunesmith.training.run_dir import read_run_info

    info = read_run_info(path)  # a missing or unfinished run is named, with what to do
    if info["kind"] != "adapter":
        raise ServeSetupError(
            f"--adapter {name}={path}: this run trained the full model, not a LoRA adapter; "
            f"serve it on its own: tunesmith serve {path}"
        )
    return _Adapter(name, path / "adapter", Path(info["base_model"]))


def _base_display_name(spec: str, base_dir: Path) -> str:
    if spec == "default" or base_dir.name.startswith(DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME
    if base_dir.name == "model" and (base_dir.parent / "run.json").is_file():
        return base_dir.parent.name  # a full fine-tuning run is served under the run's name
    return base_dir.name


def _check_same_base(adapter: _Adapter, base_dir: Path) -> None:
    """An adapter over another base would load (same shapes) and talk nonsense: refuse it, or warn
    when the base is a different copy of the same architecture."""
    if not adapter.base_dir.is_dir():
        raise ServeSetupError(f"adapter {adapter.name}: its base model is gone: {adapter.base_dir}")
    if adapter.base_dir.resolve() == base_dir.resolve():
        return
    mine, theirs = _shape_config(base_dir), _shape_config(adapter.base_dir)
    if mine != theirs:
        raise ServeSetupError(
            f"adapter {adapter.name} was trained on {adapter.base_dir}, which is not the served base "
            f"{base_dir} (different architecture); serve it with its own base: tunesmith serve {adapter.base_dir}"
        )
    log.warning(
        "adapter %s was trained on %s; serving it over %s (same architecture)",
        adapter.name,
        adapter.base_dir,
        base_dir,
    )


def _shape_config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    keys = (
        "architectures",
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "intermediate_size",
    )
    return {key: config.get(key) for key in keys}


def _load_adapters(base: Any, adapters: list[_Adapter]) -> Any:
    from peft import PeftModel

    first, *rest = adapters
    model = PeftModel.from_pretrained(base, first.directory, adapter_name="a0")
    for index, adapter in enumerate(rest, start=1):
        model.load_adapter(adapter.directory, adapter_name=f"a{index}")
    return model.eval()


def _context_length(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def add_adapter(models: ModelSet, engine: Any, name: str, path: str | Path) -> ServedModel:
    """Serve one more LoRA run (or PEFT directory) under `name` while the server runs.

    The adapter is loaded on the engine's own thread, between two decode steps (see `_on_engine_thread`),
    so no forward ever sees a half-loaded adapter; the first one also wraps the bare base into a
    PeftModel, which the engine then decodes through. Requests for `name` are accepted once this returns.
    """
    if name in models.served:
        raise ServeSetupError(f"a model named {name!r} is already served")
    base_dir = Path(models.served[models.base_name].source)
    adapter = _adapter_of(name, Path(path).expanduser())
    _check_same_base(adapter, base_dir)
    run = enclosing_run(adapter.directory)
    trust = recorded_trust(run) if run else False
    base_tokenizer = models.served[models.base_name].tokenizer
    tokenizer = _run_tokenizer(adapter.directory, run, trust, base_tokenizer)
    internal = f"a{sum(1 for m in models.served.values() if m.adapter is not None)}"
    while internal in (getattr(models.model, "peft_config", None) or {}):
        internal = f"{internal}_"

    def load() -> None:
        from peft import PeftModel

        from tunesmith.serve.routing import AdapterRouting

        if isinstance(models.model, PeftModel):
            models.model.load_adapter(adapter.directory, adapter_name=internal)
        else:
            models.model = PeftModel.from_pretrained(models.model, adapter.directory, adapter_name=internal)
        models.model.eval()
        engine.model = models.model
        engine.routing = AdapterRouting(models.model, mix=engine.routing.mixed or not engine.routing.adapters)

    _on_engine_thread(engine, load)
    served = ServedModel(
        name,
        internal,
        tokenizer,
        reply_stop_ids(models.model, tokenizer),
        str(adapter.directory),
        int(time.time()),
    )
    models.served[name] = served
    return served


def _on_engine_thread(engine: Any, work: Any, timeout: float = 600.0) -> None:
    """Run `work()` on the engine thread, where no forward is under way.

    A one-token request is the messenger: the engine calls a request's listener on its own thread,
    after the request's prefill and before any other forward, which is exactly the quiet moment
    changing the model needs. Its listener does the work, then lets the request end.
    """
    import threading

    from tunesmith.serve.sampling import SamplingParams

    done = threading.Event()
    outcome: list[BaseException | None] = []

    def on_event(event: Any) -> None:
        if outcome:
            return
        try:
            work()
            outcome.append(None)
        except BaseException as exc:  # handed to the caller, never raised on the engine thread
            outcome.append(exc)
        done.set()

    handle = engine.submit([0], SamplingParams(max_tokens=1), on_event)
    if not done.wait(timeout):
        handle.cancel()
        raise ServeSetupError(f"the engine did not take the new adapter within {timeout:.0f} s")
    if outcome[0] is not None:
        raise ServeSetupError(f"loading the adapter failed: {outcome[0]}") from outcome[0]
