"""The model zoo: ResNet, PyConvResNet and PyConvHGResNet, built from one spec table."""

from pyconv_jax.models.registry import abstract_variables, create_model, get_spec, list_models
from pyconv_jax.models.resnet import ResidualBlock, ResNet
from pyconv_jax.models.small_convnet import SmallConvNet
from pyconv_jax.models.specs import MODEL_SPECS, ModelSpec, Published

__all__ = [
    "MODEL_SPECS",
    "ModelSpec",
    "Published",
    "ResNet",
    "ResidualBlock",
    "SmallConvNet",
    "abstract_variables",
    "create_model",
    "get_spec",
    "list_models",
]
