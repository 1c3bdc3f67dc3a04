"""Flax models with logical-axis annotations (they take arrays, know nothing
of training or data)."""

from velo_scale.models.conformer import Conformer
from velo_scale.models.decision_transformer import DecisionTransformer
from velo_scale.models.deepspeech import DeepSpeech
from velo_scale.models.dlrm import DLRMSmall
from velo_scale.models.gnn import GNN
from velo_scale.models.resnet import ResNet
from velo_scale.models.small import CNN, MLP
from velo_scale.models.transformer import Transformer
from velo_scale.models.unet import UNet
from velo_scale.models.vit import ViT

__all__ = [
    "CNN",
    "Conformer",
    "DLRMSmall",
    "DecisionTransformer",
    "DeepSpeech",
    "GNN",
    "MLP",
    "ResNet",
    "Transformer",
    "UNet",
    "ViT",
]
