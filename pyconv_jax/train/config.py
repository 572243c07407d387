"""Training configuration: the defaults every recipe starts from, and their validation.

Defaults are the paper's ImageNet recipe: SGD momentum 0.9, lr 0.1 per 256 images (scaled linearly
with the batch), weight decay 1e-4, batch 256, 90 epochs, x0.1 at epochs 30/60/80; random-resized
crop 224 + flip for training, resize 256 + center crop 224 for evaluation. Recipes in ``configs/``
call :func:`default_config` and override a few fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    """The paper's default ImageNet recipe for PyConvResNet-50; every field is documented inline."""
    config = ml_collections.ConfigDict()

    # Model: a registry name plus constructor overrides (see pyconv_jax.models.ResNet).
    config.model = "pyconvresnet50"
    config.model_kwargs = ml_collections.ConfigDict()
    config.model_kwargs.dtype = "float32"  # compute dtype; params stay float32
    config.model_kwargs.dropout_rate = 0.0
    config.model_kwargs.zero_init_residual = False
    config.model_kwargs.pyconv_lowering = "auto"
    config.model_kwargs.remat = False
    # Pyramid per stage; None keeps the architecture's published pyramid. Example override:
    # --config.model_kwargs.pyconv_kernels="((3,5),(3,5),(3,),(3,))"
    config.model_kwargs.pyconv_kernels = config_dict.placeholder(tuple)
    config.model_kwargs.pyconv_groups = config_dict.placeholder(tuple)
    config.model_kwargs.stage_widths = config_dict.placeholder(tuple)  # None: the published widths

    # Data (tensorflow-datasets name, "digits", or "imagefolder:/path").
    config.dataset = "imagenet2012"
    config.data_dir = config_dict.placeholder(str)
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.eval_resize = 256  # shorter side before the center crop
    config.augment = "inception_crop"  # "inception_crop" | "resize_flip" | "none"
    config.shuffle_buffer = 16_384
    # Input shards (0: one per process). A single process with input_shards=P reads exactly the
    # global batches a P-process run reads, e.g. to reproduce a multi-host run on one machine.
    config.input_shards = 0

    # Batches are global: split over every device of every process.
    config.batch_size = 256
    config.eval_batch_size = 256

    # Length: num_train_steps wins when > 0.
    config.num_epochs = 90.0
    config.num_train_steps = -1

    # Optimiser (optax): SGD with momentum and coupled weight decay, as PyTorch's SGD.
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = False
    config.learning_rate = 0.1  # per `lr_batch_size` images; scaled linearly with batch_size
    config.lr_batch_size = 256
    config.weight_decay = 1e-4
    config.schedule = "step"  # "step" | "cosine" | "constant"
    config.lr_decay_epochs = (30.0, 60.0, 80.0)
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.label_smoothing = 0.0
    config.grad_clip_norm = 0.0  # 0 disables clipping
    config.skip_nonfinite_updates = False  # False: stop with an error naming the step
    config.cutmix_prob = 0.0  # probability of applying CutMix to a batch
    config.cutmix_alpha = 1.0

    # Logging, evaluation and checkpoints (in steps; eval_every_steps <= 0: once per epoch).
    config.log_every_steps = 100
    config.eval_every_steps = -1
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.init_from = config_dict.placeholder(str)  # checkpoint dir to fine-tune from
    config.freeze_backbone = False  # with init_from: train only the classifier
    config.seed = 0
    return config


_CHOICES = {
    "optimizer": ("sgd",),
    "schedule": ("step", "cosine", "constant"),
    "augment": ("inception_crop", "resize_flip", "none"),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, in one line, on values that would otherwise break deep inside a run.

    Unknown keys are already rejected by ``config_flags`` (and by ConfigDict attribute access);
    this checks ranges, choices and the model name before any data is read or code compiled.
    """
    from pyconv_jax.models import get_spec

    get_spec(config.model)  # unknown model names list the known ones
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"config.{key}={config[key]!r} is not one of {list(choices)}.")
    positive = ("batch_size", "eval_batch_size", "image_size", "learning_rate", "lr_batch_size",
                "log_every_steps", "checkpoint_every_steps", "keep_checkpoints")
    for key in positive:
        if not config[key] > 0:
            raise ValueError(f"config.{key} must be > 0, got {config[key]!r}.")
    if config.num_train_steps <= 0 and not config.num_epochs > 0:
        raise ValueError("set config.num_epochs > 0 or config.num_train_steps > 0.")
    for key in ("weight_decay", "label_smoothing", "warmup_epochs", "grad_clip_norm", "cutmix_prob"):
        if config[key] < 0:
            raise ValueError(f"config.{key} must be >= 0, got {config[key]!r}.")
    if config.label_smoothing >= 1 or config.cutmix_prob > 1:
        raise ValueError("config.label_smoothing must be < 1 and config.cutmix_prob <= 1.")
    if config.eval_resize < config.image_size:
        raise ValueError(
            f"config.eval_resize={config.eval_resize} is smaller than config.image_size="
            f"{config.image_size}; the center crop needs eval_resize >= image_size."
        )
    if config.input_shards < 0:
        raise ValueError(f"config.input_shards must be >= 0, got {config.input_shards}.")
    if config.freeze_backbone and not config.init_from:
        raise ValueError("config.freeze_backbone needs config.init_from (a checkpoint to start from).")


def model_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """Constructor arguments of the configured model: ``config.model_kwargs`` without unset ones."""
    kwargs = {k: v for k, v in config.model_kwargs.to_dict().items() if v is not None}
    kwargs["num_classes"] = num_classes
    return kwargs
