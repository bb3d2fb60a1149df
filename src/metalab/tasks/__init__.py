"""Task samplers, and the spec (what an example looks like, how it is scored) that they share with trained models."""

from metalab.tasks.base import ClassificationTasks, RegressionTasks, TaskSampler
from metalab.tasks.spec import ImageFormat, TaskSpec

__all__ = ["ClassificationTasks", "ImageFormat", "RegressionTasks", "TaskSampler", "TaskSpec"]
