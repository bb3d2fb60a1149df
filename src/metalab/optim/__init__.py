"""Optimizers as objects: inner-loop (init, update) pairs, the coordinatewise LSTM rule, the learned
optimizer as a torch.optim.Optimizer, and the hand-designed baselines it is compared with."""

from metalab.optim.inner import InnerOptimizer, adam, sgd
from metalab.optim.learned import LearnedOptimizer

__all__ = ["InnerOptimizer", "LearnedOptimizer", "adam", "sgd"]
