"""Models: ordinary nn.Modules, called functionally with torch.func.functional_call."""
from metalab.models.conv4 import Conv4
from metalab.models.mlp import MLP

__all__ = ["Conv4", "MLP"]
