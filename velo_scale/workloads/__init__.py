"""Workloads: a model, its loss and its evaluation, for `train(workload=...)`.

Each module holds one family of tasks and exports `GIN_CONFIGURABLES`
(`{name: class or function}`), which the CLI registers with gin. Optional
packages (rdkit, gymnasium, sacrebleu, ...) are imported only when a workload
needs them.
"""

from velo_scale.workloads.base import (
    FullScale,
    Workload,
    abstract_variables,
    count_params,
    split_variables,
)
from velo_scale.workloads.classification import Classification
from velo_scale.workloads.criteo import ClickPrediction
from velo_scale.workloads.decision_transformer import DecisionTransformerWorkload
from velo_scale.workloads.fastmri import FastMRI
from velo_scale.workloads.molecules import MoleculeClassification
from velo_scale.workloads.speech import SpeechRecognition
from velo_scale.workloads.translation import Translation

__all__ = [
    "Classification",
    "ClickPrediction",
    "DecisionTransformerWorkload",
    "FastMRI",
    "FullScale",
    "MoleculeClassification",
    "SpeechRecognition",
    "Translation",
    "Workload",
    "abstract_variables",
    "count_params",
    "split_variables",
]
