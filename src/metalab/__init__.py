"""metalab: config-driven meta-learning on PyTorch. The public API, re-exported."""
from metalab.algorithms import IMAML, MAML, Algorithm, EpisodicAlgorithm
from metalab.errors import ConfigError, MetalabError, TrainingDiverged
from metalab.evaluation import confidence_interval, evaluate_tasks
from metalab.tasks import ClassificationTasks, RegressionTasks, TaskSampler
from metalab.trainer import Trainer
from metalab.types import Params, TaskBatch

__all__ = ["Algorithm", "ClassificationTasks", "ConfigError", "EpisodicAlgorithm", "IMAML", "MAML", "MetalabError",
           "Params", "RegressionTasks", "TaskBatch", "TaskSampler", "Trainer", "TrainingDiverged",
           "confidence_interval", "evaluate_tasks"]
