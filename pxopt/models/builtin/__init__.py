"""Built-in Fashion-MNIST reference models (the offline default)."""

from pxopt.models.builtin.registry import BUILTINS, get_builtin, load_builtin, train_builtin
from pxopt.models.builtin.transform import FmnistTransform

__all__ = ["BUILTINS", "FmnistTransform", "get_builtin", "load_builtin", "train_builtin"]
