"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np


def fast_variables(model, x, seed=0, train_stats=False):
    """Variables of ``model`` with He-scaled random kernels, filled in numpy.

    Avoids compiling ``model.init`` (the random initialisers of a deep net take longer to compile
    than its forward pass); the values have the same scale as a real init. ``train_stats`` fills
    BatchNorm running statistics and affine parameters with random values instead of 0/1.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))

    def fill(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), shape), leaf.dtype)
        if train_stats:
            if name in ("scale", "var"):
                return jnp.asarray(rng.uniform(0.5, 1.5, shape), leaf.dtype)
            return jnp.asarray(rng.normal(0, 0.1, shape), leaf.dtype)
        return jnp.ones(shape, leaf.dtype) if name in ("scale", "var") else jnp.zeros(shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
