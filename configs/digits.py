r"""The embedded demo: a small PyConvResNet trained on scikit-learn's 8x8 digits, offline.

1,437 training / 360 test images upscaled to 16x16; PyConvResNet-18 with its published pyramids
and zero-initialised residual branches; 2-core CPU: about 3 minutes, ~98-99% test top-1.

    python scripts/train.py --config configs/digits.py --workdir runs/digits
"""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet18"
    config.model_kwargs.zero_init_residual = True
    config.dataset = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 16
    config.eval_resize = 16
    config.augment = "none"
    config.shuffle_buffer = 2048
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 15.0
    config.learning_rate = 0.1
    config.lr_batch_size = 64
    config.weight_decay = 5e-4
    config.schedule = "cosine"
    config.warmup_epochs = 1.0
    config.label_smoothing = 0.1
    config.log_every_steps = 20
    config.eval_every_steps = -1
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    return config
