r"""Fine-tunes ImageNet-trained PyConvResNet-50 on Imagenette (10 classes), a small tfds dataset.

The classifier is re-initialised for 10 classes (the log says so); the rest starts from the
converted published weights (see scripts/convert_checkpoint.py). Freeze everything but the
classifier with --config.freeze_backbone=True.

    python scripts/convert_checkpoint.py --arch pyconvresnet50 \
        --torch_checkpoint pyconvresnet50.pth --output ~/.cache/pyconv_jax/pyconvresnet50
    python scripts/train.py --config configs/pyconv50_finetune_imagenette.py --workdir runs/ft
"""

import os

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet50"
    config.init_from = os.path.expanduser("~/.cache/pyconv_jax/pyconvresnet50")
    config.dataset = "imagenette/320px-v2"
    config.eval_split = "validation"
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = 10.0
    config.learning_rate = 0.01
    config.lr_batch_size = 64
    config.schedule = "cosine"
    config.warmup_epochs = 1.0
    config.checkpoint_every_steps = 500
    return config
