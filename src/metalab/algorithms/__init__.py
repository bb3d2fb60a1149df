"""Algorithm plugins."""
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.algorithms.episodic import EpisodicAlgorithm
from metalab.algorithms.imaml import IMAML
from metalab.algorithms.maml import MAML

__all__ = ["Algorithm", "EpisodicAlgorithm", "IMAML", "MAML", "NonFiniteLossError"]
