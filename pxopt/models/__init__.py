"""Models from one spec string: torchvision, timm, checkpoint files, built-in references.

`load_model(spec)` returns the module together with its preprocessing, so a task always
sees images the way the weights were trained on them. Knows nothing about Optuna.
"""

from pxopt.models.load import describe_supported, load_model
from pxopt.models.loaded import LoadedModel
from pxopt.models.spec import ModelSpec, parse_spec

__all__ = ["LoadedModel", "ModelSpec", "describe_supported", "load_model", "parse_spec"]
