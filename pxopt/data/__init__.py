"""Datasets, class subsets and the reference / validation sets of a task.

Knows nothing about models or LRP: a model enters only as its preprocessing
(`transform`) and its number of outputs (`num_model_classes`).
"""

from pxopt.data.accuracy import restricted_accuracy, restricted_correct, restricted_predictions
from pxopt.data.sources import FASHION_MNIST_CLASSES, Dataset, Split, open_dataset
from pxopt.data.task import Task, make_task, other_reference
from pxopt.data.tensorset import TensorSet

__all__ = [
    "FASHION_MNIST_CLASSES",
    "Dataset",
    "Split",
    "Task",
    "TensorSet",
    "make_task",
    "open_dataset",
    "other_reference",
    "restricted_accuracy",
    "restricted_correct",
    "restricted_predictions",
]
