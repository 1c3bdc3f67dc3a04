"""Meta-training of VeLO weights with Evolution Strategies (paper Sec. 3, App. C-E)."""

from velo_scale.meta.distribution import (
    AugmentedTask,
    AutoencoderTask,
    ConvTask,
    sample_task,
    sample_tasks,
    task_distribution,
)
from velo_scale.meta.es import (
    ESConfig,
    PESState,
    antithetic_estimate,
    es_gradient,
    meta_loss,
    normalise,
    pes_gradient,
    pes_task_init,
    split_runtime,
    task_signature,
    with_runtime,
)
from velo_scale.meta.init import normalised_momentum_theta, search_lr_mult
from velo_scale.meta.lm_tasks import LSTMLMTask, TransformerLMTask
from velo_scale.meta.tasks import ClassificationTask, digits_mlp_task
from velo_scale.meta.vit_tasks import ViTTask

__all__ = [
    "AugmentedTask",
    "AutoencoderTask",
    "ClassificationTask",
    "ConvTask",
    "ESConfig",
    "LSTMLMTask",
    "PESState",
    "TransformerLMTask",
    "ViTTask",
    "antithetic_estimate",
    "digits_mlp_task",
    "es_gradient",
    "meta_loss",
    "normalise",
    "normalised_momentum_theta",
    "pes_gradient",
    "pes_task_init",
    "sample_task",
    "sample_tasks",
    "search_lr_mult",
    "split_runtime",
    "task_distribution",
    "task_signature",
    "with_runtime",
]
