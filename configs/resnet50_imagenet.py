r"""The paper's baseline: torchvision-layout ResNet-50 on ImageNet, default recipe.

    python scripts/train.py --config configs/resnet50_imagenet.py --workdir runs/resnet50
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet50"
    return config
