"""Training: configs, the pure train/eval steps, and the sharded training loop.

The loop's names load on first use, so that :mod:`pyconv_jax.train.steps` imports without the
input pipeline's TensorFlow, tensorflow-datasets and ml_collections, nor orbax: the benchmarks
and the device checks need only the steps, and run where those are not installed (the GPU
machines).
"""

from pyconv_jax._lazy import lazy_exports

_EXPORTS = {
    "default_config": "pyconv_jax.train.config",
    "validate_config": "pyconv_jax.train.config",
    "train_and_evaluate": "pyconv_jax.train.loop",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
