"""Flax models: the GroupNorm ResNet18 of the paper's reproduction and its family, torchvision conversion, and an
MLP for feature vectors (tabular data)."""

from jaxdp.models import torchvision
from jaxdp.models.factory import create_model, init_variables, random_params
from jaxdp.models.mlp import MLP
from jaxdp.models.resnet import BasicBlock, ResNet, ResNet18
from jaxdp.models.torchvision import convert_resnet18_state_dict, load_torchvision_checkpoint

__all__ = [
    "BasicBlock",
    "MLP",
    "ResNet",
    "ResNet18",
    "convert_resnet18_state_dict",
    "create_model",
    "init_variables",
    "load_torchvision_checkpoint",
    "random_params",
    "torchvision",
]
