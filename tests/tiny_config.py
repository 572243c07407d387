"""A seconds-long training config for tests: a narrow two-level PyConvResNet-18 on digits 16x16."""

from pyconv_jax.train.config import default_config


def get_config():
    config = default_config()
    config.model = "pyconvresnet18"
    config.model_kwargs.stage_widths = (16, 32, 64, 128)
    config.model_kwargs.pyconv_kernels = ((3, 5), (3, 5), (3,), (3,))
    config.model_kwargs.pyconv_groups = ((1, 4), (1, 4), (1,), (1,))
    config.dataset = "digits"
    config.eval_split = "test"
    config.image_size = 16
    config.eval_resize = 16
    config.augment = "none"
    config.shuffle_buffer = 512
    config.batch_size = 16
    config.eval_batch_size = 120
    config.num_train_steps = 6
    config.learning_rate = 0.05
    config.lr_batch_size = 16
    config.schedule = "cosine"
    config.warmup_epochs = 0.0
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 10
    config.async_checkpoints = False
    return config
