r"""PyConvHGResNet-50 on ImageNet with the paper's default recipe (see configs/default.py).

    python scripts/train.py --config configs/pyconvhg50_imagenet.py --workdir runs/pyconvhg50
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvhgresnet50"
    return config
