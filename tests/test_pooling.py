"""max_pool: equal to flax's pool forward and backward, ties included; bad arguments."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyconv_jax.layers.pooling import max_pool


def _flax_pool(window, stride, padding):
    return functools.partial(nn.max_pool, window_shape=(window, window), strides=(stride, stride),
                             padding=((padding, padding), (padding, padding)))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("window,stride,padding", [
    (3, 2, 1),  # the models' pool
    (3, 2, 0), (3, 1, 1), (3, 3, 2), (2, 2, 1), (5, 2, 2), (5, 3, 4), (1, 1, 0), (4, 1, 3),
])
def test_it_equals_flax_forward_and_backward(window, stride, padding, ties):
    """Each window's gradient goes to its first maximum in row-major order, as XLA's
    select_and_scatter sends it. With ties (post-ReLU zeros, repeated values) a wrong choice
    would move whole units."""
    rng = np.random.default_rng(window * 100 + stride * 10 + padding)
    ref = _flax_pool(window, stride, padding)
    for shape in [(2, 9, 7, 3), (2, 8, 8, 4), (1, 5, 6, 2)]:  # odd and even sizes
        x = rng.normal(size=shape).astype(np.float32)
        if ties:
            x = np.round(np.maximum(x, 0) * 2) / 2
        x = jnp.asarray(x)
        w = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
        np.testing.assert_array_equal(max_pool(x, window, stride, padding), ref(x))
        ours = jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, padding) * w))(x)
        theirs = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_window_of_equal_values_sends_its_whole_gradient_to_its_first_pixel():
    """A constant input makes every window one tie: the border windows, which overlap the
    padding, must send their gradient to the window's first real pixel."""
    x = jnp.zeros((1, 4, 4, 1), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(max_pool(x, 3, 2, 1)))(x)[0, :, :, 0]
    # Windows start at rows/columns -1 and 1: their first real pixels are 0 and 1.
    expected = np.zeros((4, 4), np.float32)
    for r in (0, 1):
        for c in (0, 1):
            expected[r, c] = 1.0
    np.testing.assert_array_equal(g, expected)
    flax_grad = jax.grad(lambda x: jnp.sum(_flax_pool(3, 2, 1)(x)))(x)
    np.testing.assert_array_equal(g, flax_grad[0, :, :, 0])


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 3), (3, 0, 1), (0, 1, 0), (3, 2, -1)])
def test_bad_arguments_get_a_one_line_error(window, stride, padding):
    with pytest.raises(ValueError, match="max_pool needs") as error:
        max_pool(jnp.zeros((1, 8, 8, 1)), window, stride, padding)
    assert "\n" not in str(error.value)
