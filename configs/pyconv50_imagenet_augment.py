r"""PyConvResNet-50 with the authors' stronger recipe (reported 79.44% top-1 at 224).

Batch 1024, lr 0.4 (0.1 per 256), cosine over 300 epochs with 5 warm-up epochs, CutMix,
bfloat16 compute, zero-initialised last BN of each block.

    python scripts/train.py --config configs/pyconv50_imagenet_augment.py --workdir runs/pc50aug
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet50"
    config.model_kwargs.dtype = "bfloat16"
    config.model_kwargs.zero_init_residual = True
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 300.0
    config.schedule = "cosine"
    config.warmup_epochs = 5.0
    config.cutmix_prob = 1.0
    config.cutmix_alpha = 1.0
    return config
