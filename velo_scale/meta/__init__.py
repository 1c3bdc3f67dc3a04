"""Meta-training of VeLO weights with Evolution Strategies (paper Sec. 3, App. C-E)."""

from velo_scale.meta.distribution import sample_task, sample_tasks, task_distribution
from velo_scale.meta.es import (
    ESConfig,
    antithetic_estimate,
    es_gradient,
    meta_loss,
    normalise,
)
from velo_scale.meta.tasks import ClassificationTask, digits_mlp_task

__all__ = [
    "ClassificationTask",
    "ESConfig",
    "antithetic_estimate",
    "digits_mlp_task",
    "es_gradient",
    "meta_loss",
    "normalise",
    "sample_task",
    "sample_tasks",
    "task_distribution",
]
