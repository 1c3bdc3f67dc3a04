"""Training engine: the trainer, optimizers, train state, checkpointing,
metrics and reports. No gin here: the CLI binds `train` with gin."""

from velo_scale.train.lock import WorkdirLockedError
from velo_scale.train.optimizers import OPTIMIZERS, Optimizer
from velo_scale.train.run_config import ConfigMismatchError
from velo_scale.train.signals import TrainingInterrupted
from velo_scale.train.state import TrainState
from velo_scale.train.trainer import (
    DEFAULT_AXIS_RULES,
    NonFiniteLossError,
    TrainResult,
    train,
)

__all__ = [
    "ConfigMismatchError",
    "DEFAULT_AXIS_RULES",
    "NonFiniteLossError",
    "OPTIMIZERS",
    "Optimizer",
    "TrainResult",
    "TrainState",
    "TrainingInterrupted",
    "WorkdirLockedError",
    "train",
]
