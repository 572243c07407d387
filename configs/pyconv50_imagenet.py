r"""PyConvResNet-50 on ImageNet with the paper's default recipe (see configs/default.py).

    python scripts/train.py --config configs/pyconv50_imagenet.py --workdir runs/pyconv50
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet50"
    return config
