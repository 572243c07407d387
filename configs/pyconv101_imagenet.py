r"""PyConvResNet-101 on ImageNet with the paper's default recipe (see configs/default.py).

    python scripts/train.py --config configs/pyconv101_imagenet.py --workdir runs/pyconv101
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet101"
    return config
