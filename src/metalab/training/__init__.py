"""The trainer (the loop and its schedule) and what it writes: checkpoints, evaluations, metrics, results."""

from metalab.training.evaluation import confidence_interval, evaluate_tasks
from metalab.training.trainer import Trainer

__all__ = ["Trainer", "confidence_interval", "evaluate_tasks"]
