r"""Defaults shared by every recipe: the paper's ImageNet recipe for PyConvResNet-50.

SGD momentum 0.9, lr 0.1 per 256 images (scaled linearly with the batch), weight decay 1e-4,
batch 256, 90 epochs, x0.1 at epochs 30/60/80; random-resized crop 224 + flip for training,
resize 256 + center crop 224 for evaluation. Other configs import this and override a few fields.

    python scripts/train.py --config configs/default.py --workdir runs/x --config.batch_size=512
"""

from pyconv_jax.train.config import default_config


def get_config():
    return default_config()
