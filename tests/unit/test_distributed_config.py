"""`distributed:` becomes accelerate's plugins; what cannot run here is refused, never ignored."""

from __future__ import annotations

import importlib.util

import pytest

from tunesmith.config.distributed import DistributedConfig
from tunesmith.training.distributed import DistributedSetupError, accelerator_plugins, fsdp2_plugin


def test_ddp_needs_no_plugin():
    assert accelerator_plugins(None, "cpu") == {}
    assert accelerator_plugins(DistributedConfig(), "cpu") == {}
    assert accelerator_plugins(DistributedConfig(strategy="ddp"), "cuda") == {}


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_sharding_on_cpu_is_refused_with_the_fix(strategy):
    with pytest.raises(DistributedSetupError, match=rf"strategy={strategy}.*use distributed.strategy=ddp"):
        accelerator_plugins(DistributedConfig(strategy=strategy), "cpu")


def test_fsdp2_options_reach_the_plugin():
    section = DistributedConfig(strategy="fsdp2", fsdp={"reshard_after_forward": False, "cpu_offload": True})
    plugin = fsdp2_plugin(section)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is False
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    default = fsdp2_plugin(DistributedConfig(strategy="fsdp2"))
    assert default.reshard_after_forward is True
    assert type(default.cpu_offload).__name__ == "OffloadPolicy"  # the base policy: no offload


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_missing_says_how_to_install():
    with pytest.raises(DistributedSetupError, match="pip install deepspeed"):
        accelerator_plugins(DistributedConfig(strategy="deepspeed"), "cuda")


def test_bad_values_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="strategy"):
        DistributedConfig(strategy="zero")
    with pytest.raises(ValidationError, match="zero_stage"):
        DistributedConfig(strategy="deepspeed", deepspeed={"zero_stage": 4})
