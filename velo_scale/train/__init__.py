"""Training engine: the trainer, optimizers, train state, checkpointing,
metrics and reports. No gin here: the CLI binds `train` with gin."""

from velo_scale.train.optimizers import OPTIMIZERS, Optimizer
from velo_scale.train.state import TrainState
from velo_scale.train.trainer import (
    DEFAULT_AXIS_RULES,
    NonFiniteLossError,
    TrainResult,
    train,
)

__all__ = [
    "DEFAULT_AXIS_RULES",
    "NonFiniteLossError",
    "OPTIMIZERS",
    "Optimizer",
    "TrainResult",
    "TrainState",
    "train",
]
