"""Training: configs, the pure train/eval steps, and the sharded training loop."""

from pyconv_jax.train.config import default_config, validate_config
from pyconv_jax.train.loop import train_and_evaluate

__all__ = ["default_config", "train_and_evaluate", "validate_config"]
