"""Optimizers written here: where no maintained package fits (exact resume needs tensor-only state)."""

from tunesmith.training.optimizers.badam import BAdam
from tunesmith.training.optimizers.chain import OptimizerChain
from tunesmith.training.optimizers.lowrank import Apollo, GaLoreAdamW

__all__ = ["Apollo", "BAdam", "GaLoreAdamW", "OptimizerChain"]
