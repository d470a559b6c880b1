"""The `distributed:` section as accelerate plugins: the one place the sharding engines enter.

DDP needs no plugin (accelerate wraps the model when it runs with several processes). FSDP2 and
DeepSpeed are refused on CPU with a message rather than left to accelerate, which ignores them there
and would train with plain DDP while the config says otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tunesmith.config.distributed import DistributedConfig


class DistributedSetupError(ValueError):
    """A `distributed:` setting this machine or installation cannot run; the message says why and what to do."""


def accelerator_plugins(
    section: DistributedConfig | None, device_type: str, max_grad_norm: float | None = None
) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)` that carry the strategy (empty for DDP)."""
    if section is None or section.strategy == "ddp":
        return {}
    if device_type != "cuda":
        raise DistributedSetupError(
            f"distributed.strategy={section.strategy} shards the model across GPUs, and this machine has none "
            "(accelerate ignores FSDP and DeepSpeed on CPU and would silently run plain DDP); use "
            "distributed.strategy=ddp here"
        )
    if section.strategy == "fsdp2":
        return {"fsdp_plugin": fsdp2_plugin(section)}
    deepspeed_plugin(section, max_grad_norm)  # the installation and the options are checked first
    raise DistributedSetupError(
        "distributed.strategy=deepspeed: the training loop does not drive DeepSpeed's engine yet (the engine "
        "accumulates and clips gradients itself, the loop does both on its own); use distributed.strategy=fsdp2 "
        "for sharded training"
    )


def fsdp2_plugin(section: DistributedConfig) -> Any:
    from accelerate.utils import FullyShardedDataParallelPlugin

    options = section.fsdp
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=options.reshard_after_forward,
        cpu_offload=options.cpu_offload,
        auto_wrap_policy="transformer_based_wrap",  # one shard unit per decoder layer (the model's _no_split_modules)
        state_dict_type="FULL_STATE_DICT",
    )


def deepspeed_plugin(section: DistributedConfig, max_grad_norm: float | None) -> Any:
    if importlib.util.find_spec("deepspeed") is None:
        raise DistributedSetupError(
            "distributed.strategy=deepspeed needs the deepspeed package, which is not installed: "
            "pip install deepspeed (or use distributed.strategy=fsdp2, which needs nothing extra)"
        )
    from accelerate.utils import DeepSpeedPlugin

    options = section.deepspeed
    if options.offload_params != "none" and options.zero_stage != 3:
        raise DistributedSetupError(
            f"distributed.deepspeed.offload_params={options.offload_params} needs zero_stage 3 (parameters are "
            f"only sharded there), not {options.zero_stage}; set distributed.deepspeed.zero_stage=3 or "
            "offload_params=none"
        )
    return DeepSpeedPlugin(
        zero_stage=options.zero_stage,
        offload_optimizer_device=options.offload_optimizer,
        offload_param_device=options.offload_params,
        gradient_accumulation_steps=1,  # the loop accumulates itself and steps the optimizer once per step
        gradient_clipping=max_grad_norm if max_grad_norm else 1.0e9,
    )
