"""An OpenAI fine-tuning job request, checked, and turned into the tunesmith run config it trains with.

The mapping (what each OpenAI field means here):
- `model`: the base this server serves (its served name, `default` when that is the embedded model,
  or the base's own path): the result must be servable over the loaded base, so no other model.
- `training_file` / `validation_file` -> `data.train` / `data.eval` (the stored files' paths).
- `method.type` `supervised` -> `method: sft`; `dpo` -> `method: dpo` with `dpo.beta` from `beta`.
- `n_epochs` -> `train.epochs` (auto: 3); `batch_size` -> `train.batch_size` (auto: 4, at most the
  number of examples); `learning_rate_multiplier` multiplies the default learning rate `train.lr`
  (2e-4, or the server's job defaults' `train.lr`), auto: 1.
- `seed` -> `train.seed` (random when not given, and reported); `suffix` goes into the model name.
The server's job defaults (a partial run config) lie under all of this.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tunesmith.config.load import ConfigError, format_validation_error
from tunesmith.config.schema import DPOConfig, RunConfig, TrainConfig

AUTO_EPOCHS = 3
AUTO_BATCH = 4
SUFFIX_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"


class _Supervised(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class _Dpo(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"]
    supervised: _Supervised | None = None
    dpo: _Dpo | None = None


class JobRequest(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None  # the older top-level place; method's wins
    method: Method | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, StringConstraints(pattern=SUFFIX_PATTERN)] | None = None
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    integrations: list[Any] | None = None

    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None:
            section = self.method.dpo if self.method.type == "dpo" else self.method.supervised
            if section is not None:
                return section.hyperparameters
        if self.method_type() == "dpo":
            return DpoHyperparameters(**(self.hyperparameters.model_dump() if self.hyperparameters else {}))
        return self.hyperparameters or Hyperparameters()


class RequestError(ValueError):
    """A request field that is wrong; `param` names it the way OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_request(body: Any) -> JobRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = JobRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(
            str(part) for part in first["loc"] if not str(part).startswith(("function-", "literal"))
        )
        raise RequestError(_validation_message(exc), param or None) from None
    if request.integrations:
        raise RequestError("integrations are not supported by this server", "integrations")
    return request


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(part) for part in err["loc"])
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


@dataclass(frozen=True)
class Resolved:
    """What the job will run with: the run config (a dict, validated) and the numbers to report."""

    config: dict[str, Any]
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    seed: int


def build_config(
    request: JobRequest,
    base_path: str,
    train_path: str,
    eval_path: str | None,
    run_dir: str,
    examples: int,
    defaults: dict[str, Any] | None = None,
) -> Resolved:
    """The run config of this job; ConfigError (naming the key) when the combination is invalid."""
    config = copy.deepcopy(defaults or {})
    train = config.setdefault("train", {})
    default_lr = float(train.get("lr", TrainConfig.model_fields["lr"].default))
    hyper = request.chosen_hyperparameters()
    epochs = AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs
    batch = min(AUTO_BATCH, max(examples, 1)) if hyper.batch_size == "auto" else hyper.batch_size
    multiplier = 1.0 if hyper.learning_rate_multiplier == "auto" else float(hyper.learning_rate_multiplier)
    seed = request.seed if request.seed is not None else random.randrange(2**31)
    train.update(epochs=epochs, batch_size=batch, lr=default_lr * multiplier, seed=seed, resume="auto")
    config["model"] = base_path
    data = config.setdefault("data", {})
    data["train"] = [{"path": train_path}]
    data["eval"] = [{"path": eval_path}] if eval_path else []
    config["output"] = {**config.get("output", {}), "dir": run_dir}
    reported: dict[str, Any] = {
        "n_epochs": epochs,
        "batch_size": batch,
        "learning_rate_multiplier": multiplier,
    }
    if request.method_type() == "dpo":
        beta_given = getattr(hyper, "beta", "auto")
        beta = DPOConfig.model_fields["beta"].default if beta_given == "auto" else float(beta_given)
        config["method"] = "dpo"
        config["dpo"] = {**config.get("dpo", {}), "beta": beta}
        reported["beta"] = beta
    else:
        config["method"] = "sft"
    try:
        RunConfig.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    kind = request.method_type()
    method = {"type": kind, kind: {"hyperparameters": reported}}
    return Resolved(config, method, reported, seed)


def model_name(base: str, org: str, suffix: str | None, job_id: str) -> str:
    """`ft:{base}:{org}:{suffix}:{id}`; no `/` (clients percent-encode it in /v1/models/{id})."""
    short = job_id.removeprefix("ftjob-")
    return ":".join(("ft", re.sub(r"[/:]", "-", base), org, suffix or "", short))
