"""`distributed:` how several processes share the model: DDP copies it, FSDP2 and DeepSpeed ZeRO shard it.

The section only names a strategy and its few options; training/distributed.py turns it into
accelerate's plugins, so the engines are accelerate's own and nothing here schedules processes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.config.section import Section


class FsdpOptions(Section):
    """FSDP2 (torch's `fully_shard`), one shard unit per decoder layer."""

    reshard_after_forward: bool = Field(
        True,
        description="free the gathered weights after each layer's forward (ZeRO-3 like); false keeps them (ZeRO-2 like)",
    )
    cpu_offload: bool = Field(False, description="keep the sharded parameters and gradients in CPU memory")


class DeepSpeedOptions(Section):
    """DeepSpeed ZeRO through accelerate's DeepSpeedPlugin (needs the `deepspeed` package)."""

    zero_stage: Literal[1, 2, 3] = Field(
        2, description="1: optimizer states, 2: + gradients, 3: + parameters sharded"
    )
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="optimizer states in CPU memory")
    offload_params: Literal["none", "cpu"] = Field(
        "none", description="parameters in CPU memory (stage 3 only)"
    )


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp2", "deepspeed"] = Field(
        "ddp",
        description="ddp: every process holds the model; fsdp2 / deepspeed: the model is sharded (GPU only)",
    )
    fsdp: FsdpOptions = Field(default_factory=FsdpOptions)
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions)
