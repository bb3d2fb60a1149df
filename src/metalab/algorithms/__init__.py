"""Algorithm plugins."""

from metalab.algorithms.anil import ANIL
from metalab.algorithms.auxilearn import AuxiLearn
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.algorithms.episodic import EpisodicAlgorithm
from metalab.algorithms.imaml import IMAML
from metalab.algorithms.lstm_optimizer import LSTMOptimizer
from metalab.algorithms.maml import MAML
from metalab.algorithms.pretrain import Pretrain
from metalab.algorithms.protonet import ProtoNet
from metalab.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "Algorithm",
    "AuxiLearn",
    "EpisodicAlgorithm",
    "LSTMOptimizer",
    "NonFiniteLossError",
    "Pretrain",
    "ProtoNet",
    "Reptile",
]
