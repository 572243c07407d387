"""Training: configs, the pure train/eval steps, and the sharded training loop.

The loop's names load on first use, so that :mod:`pyconv_jax.train.steps` imports without the
input pipeline's TensorFlow, tensorflow-datasets, ml_collections and orbax: the benchmarks and
the device checks need only the steps, and run where those are not installed (the GPU machines).
"""

import importlib

_EXPORTS = {
    "default_config": "pyconv_jax.train.config",
    "validate_config": "pyconv_jax.train.config",
    "train_and_evaluate": "pyconv_jax.train.loop",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pyconv_jax.train' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
