"""Models: ordinary nn.Modules, called functionally with torch.func.functional_call."""

from metalab.models.conv4 import Conv4
from metalab.models.mlp import MLP
from metalab.models.norm import BatchNorm

__all__ = ["BatchNorm", "Conv4", "MLP"]
