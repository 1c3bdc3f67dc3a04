"""Workloads: a model, its loss and its evaluation, for `train(workload=...)`.

Each module holds one family of tasks and exports `GIN_CONFIGURABLES`
(`{name: class or function}`), which the CLI registers with gin.
"""

from velo_scale.workloads.base import (
    FullScale,
    Workload,
    abstract_variables,
    count_params,
    split_variables,
)
from velo_scale.workloads.classification import Classification

__all__ = [
    "Classification",
    "FullScale",
    "Workload",
    "abstract_variables",
    "count_params",
    "split_variables",
]
