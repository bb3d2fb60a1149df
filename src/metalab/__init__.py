"""metalab: config-driven meta-learning on PyTorch. The public API, re-exported."""

from metalab import auxilearn  # the drop-in for the official code: metalab.auxilearn.MetaOptimizer
from metalab.algorithms import IMAML, MAML, Algorithm, AuxiLearn, EpisodicAlgorithm, LSTMOptimizer
from metalab.app.runs import load_rule
from metalab.errors import ConfigError, MetalabError, TrainingDiverged
from metalab.inference import AdaptedLearner, Learner, load_learner
from metalab.optim.learned import LearnedOptimizer
from metalab.tasks import ClassificationTasks, RegressionTasks, TaskSampler
from metalab.training.evaluation import confidence_interval, evaluate_tasks
from metalab.training.trainer import Trainer
from metalab.types import Params, TaskBatch

__all__ = [
    "auxilearn",
    "AdaptedLearner",
    "Algorithm",
    "AuxiLearn",
    "ClassificationTasks",
    "ConfigError",
    "EpisodicAlgorithm",
    "IMAML",
    "LSTMOptimizer",
    "LearnedOptimizer",
    "Learner",
    "MAML",
    "MetalabError",
    "Params",
    "RegressionTasks",
    "TaskBatch",
    "TaskSampler",
    "Trainer",
    "TrainingDiverged",
    "confidence_interval",
    "evaluate_tasks",
    "load_learner",
    "load_rule",
]
