r"""PyConvResNet-152 on ImageNet with the paper's default recipe (see configs/default.py).

    python scripts/train.py --config configs/pyconv152_imagenet.py --workdir runs/pyconv152
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet152"
    return config
