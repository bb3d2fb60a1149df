"""Task samplers."""
from metalab.tasks.base import ClassificationTasks, RegressionTasks, TaskSampler

__all__ = ["ClassificationTasks", "RegressionTasks", "TaskSampler"]
