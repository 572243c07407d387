"""Shared test helpers and fixtures."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_helpers import XLA_CACHE_ENV

jax.config.update("jax_compilation_cache_dir", XLA_CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted 6-step run of the tiny config (checkpoints at 2, 4, 6), compile log kept.

    Shared by the training and fault tests as the reference that interrupted runs must equal.
    """
    from pyconv_jax.train import train_and_evaluate
    from tests.train_helpers import compile_log, load_config

    workdir = str(tmp_path_factory.mktemp("run") / "a")
    with compile_log() as records:
        metrics = train_and_evaluate(load_config(), workdir)
    return workdir, metrics, records
