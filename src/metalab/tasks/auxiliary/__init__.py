"""Samplers of data with auxiliary tasks (AuxiLearn): a toy regression, MNIST, Omniglot, MiniImageNet."""

from metalab.tasks.auxiliary.base import AuxBatch, AuxiliaryTasks, AuxTask, labelled

__all__ = ["AuxBatch", "AuxTask", "AuxiliaryTasks", "labelled"]
